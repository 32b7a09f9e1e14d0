"""Resumable output (``out=``): chunks equal the in-memory results, finished chunks are never
recomputed, other settings are refused, ``s`` is reused, and a killed run resumes to the same
files."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from problems import make_problem, relative_error

import fastinfluence as fi
from fastinfluence import fingerprints, sharded_output
from fastinfluence.hessian.solvers import Solver

TESTS = Path(__file__).parent
OPTIONS = {"solver": "direct", "damping": 0.5}


def count_rows(influence: fi.Influence) -> list[int]:
    """Replace the backend's ``directional`` by a wrapper recording each call's sample count."""
    calls: list[int] = []
    original = influence.backend.directional

    def counted(data, directions):
        calls.append(len(data))
        return original(data, directions)

    influence.backend.directional = counted
    return calls


def chunk_files(directory: Path, kind: str = "scores") -> list[str]:
    return sorted(p.name for p in directory.glob(f"{kind}-*.npy"))


@pytest.mark.parametrize("params", ["last", "all"])
def test_scores_chunks_match_in_memory_and_rerun_computes_nothing(tmp_path, params):
    model, train, val = make_problem("mlp")
    influence = fi.Influence(model, train, val, params=params, out=tmp_path, **OPTIONS)
    expected = influence.scores()
    calls = count_rows(influence)
    written = influence.scores(out=tmp_path, chunk_size=7)
    assert calls == [7, 7, 7, 7, 7, 5]
    assert relative_error(written, expected) <= 1e-12
    assert chunk_files(tmp_path) == [f"scores-{i:05d}.npy" for i in range(6)]
    assert not list(tmp_path.glob("*.tmp"))
    on_disk = np.concatenate([np.load(tmp_path / name) for name in chunk_files(tmp_path)])
    assert np.array_equal(on_disk, written.numpy())

    again = fi.Influence(model, train, val, params=params, out=tmp_path, **OPTIONS)
    calls = count_rows(again)
    assert torch.equal(again.scores(out=tmp_path, chunk_size=7), written)
    assert calls == []

    (tmp_path / "scores-00003.npy").unlink()
    assert torch.equal(again.scores(out=tmp_path, chunk_size=7), written)
    assert calls == [7]


def test_score_with_out_and_a_data_loader(tmp_path):
    model, train, val = make_problem("mlp")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*train), batch_size=6,
                                         shuffle=True)
    written = fi.score(model, loader, val, params="all", out=tmp_path, chunk_size=16, **OPTIONS)
    expected = fi.Influence(model, train, val, params="all", **OPTIONS).scores()
    assert relative_error(written, expected) <= 1e-12
    assert chunk_files(tmp_path) == ["scores-00000.npy", "scores-00001.npy", "scores-00002.npy"]
    assert torch.equal(fi.read_output(tmp_path, "scores"), written)
    again = fi.Influence(model, loader, val, params="all", out=tmp_path, **OPTIONS)
    assert again.report.reused_ihvp  # the loader form fingerprints like itself


def test_other_queries_match_in_memory(tmp_path):
    model, train, val = make_problem("cnn")
    influence = fi.Influence(model, train, val, params="all", hessian="gauss-newton", **OPTIONS)
    x, y = val
    pairs = [
        (influence.self_influence(out=tmp_path, chunk_size=9), influence.self_influence()),
        (influence.pairwise(val, out=tmp_path, chunk_size=9), influence.pairwise(val)),
        (influence.perturbation(x, y, out=tmp_path, chunk_size=3), influence.perturbation(x, y)),
    ]
    for written, expected in pairs:
        assert written.shape == expected.shape
        assert relative_error(written, expected) <= 1e-12
    assert len(chunk_files(tmp_path, "self-influence")) == 5
    assert len(chunk_files(tmp_path, "pairwise")) == 5
    assert len(chunk_files(tmp_path, "perturbation")) == 4
    assert torch.equal(sharded_output.read_output(tmp_path, "pairwise"), pairs[1][0])


def test_pairwise_with_every_chunk_finished_solves_nothing(tmp_path):
    model, train, val = make_problem("mlp")
    influence = fi.Influence(model, train, val, params="all", solver="cg", damping=0.5,
                             tol=1e-12)
    written = influence.pairwise(val, out=tmp_path, chunk_size=16)

    def fail(*args, **kwargs):
        raise AssertionError("a finished pairwise output was solved again")

    influence.solver.solve = fail
    assert torch.equal(influence.pairwise(val, out=tmp_path, chunk_size=16), written)


@pytest.mark.parametrize(("change", "named"), [
    ({"damping": 0.4}, "options.damping"),
    ({"params": "last"}, "options.params"),
    ({"solver": "cg"}, "options.solver"),
    ({"curvature_samples": 30}, "options.curvature_samples"),
    ({"weights": True}, "model.sha256"),
    ({"train": True}, "train.sha256"),
])
def test_other_settings_are_refused(tmp_path, change, named):
    model, train, val = make_problem("mlp")
    options = {"params": "all", **OPTIONS}
    fi.Influence(model, train, val, out=tmp_path, **options).scores(out=tmp_path)
    if change.pop("weights", False):
        with torch.no_grad():
            model[0].bias[0] += 1e-9
    if change.pop("train", False):
        x, y = train
        train = (x.clone(), y)
        train[0][0, 0] += 1e-9
    with pytest.raises(ValueError, match=named.replace(".", r"\.")) as refused:
        fi.Influence(model, train, val, out=tmp_path, **{**options, **change})
    assert "other settings" in str(refused.value)


def test_a_curvature_subsample_is_part_of_the_settings(tmp_path):
    """Another seed draws other samples for ``H``: refused; the same draw is reused; all ``n``
    samples (``curvature_samples=n``) are the full curvature, the same settings as none."""
    model, train, val = make_problem("mlp")
    options = {"params": "all", **OPTIONS}
    fi.Influence(model, train, val, out=tmp_path, curvature_samples=30, **options)
    with pytest.raises(ValueError, match=r"options\.curvature_seed"):
        fi.Influence(model, train, val, out=tmp_path, curvature_samples=30, curvature_seed=1,
                     **options)
    assert fi.Influence(model, train, val, out=tmp_path, curvature_samples=30,
                        **options).report.reused_ihvp
    full = tmp_path / "full"
    fi.Influence(model, train, val, out=full, **options)
    assert fi.Influence(model, train, val, out=full, curvature_samples=len(train[1]),
                        **options).report.reused_ihvp


def test_other_data_or_chunk_size_of_an_output_is_refused(tmp_path):
    model, train, val = make_problem("mlp")
    influence = fi.Influence(model, train, val, params="all", **OPTIONS)
    influence.scores(out=tmp_path, chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size: 8 in the directory vs 5 now"):
        influence.scores(out=tmp_path, chunk_size=5)
    with pytest.raises(ValueError, match=r"data\.num_samples: 40 in the directory vs 10 now"):
        influence.scores(val, out=tmp_path, chunk_size=8)


def test_an_s_solved_elsewhere_is_refused(tmp_path):
    model, train, val = make_problem("mlp")
    first = fi.Influence(model, train, val, params="all", solver="cg", damping=0.5, tol=1e-3)
    first.scores(out=tmp_path)
    # the same settings solved in other batches (as on another machine): sums in another
    # order, an s that differs in its last bits
    second = fi.Influence(model, train, val, params="all", solver="cg", damping=0.5, tol=1e-3,
                          batch_size=7)
    assert not torch.equal(second.ihvp, first.ihvp)
    assert relative_error(second.ihvp, first.ihvp) < 1e-12
    with pytest.raises(fi.SettingsMismatchError, match="holds another s"):
        second.scores(out=tmp_path)
    assert torch.equal(fi.read_output(tmp_path, "scores"), first.scores())  # left as it was


def test_chunk_size_needs_out_and_a_positive_integer(tmp_path):
    model, train, val = make_problem("mlp")
    influence = fi.Influence(model, train, val, params="all", **OPTIONS)
    with pytest.raises(ValueError, match="chunk_size needs out"):
        influence.scores(chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        influence.self_influence(out=tmp_path, chunk_size=0)
    with pytest.raises(TypeError, match="out must be a directory path"):
        influence.scores(out=3)


def test_s_is_reused_without_solving(tmp_path, monkeypatch):
    model, train, val = make_problem("mlp")
    first = fi.Influence(model, train, val, params="all", **OPTIONS, out=tmp_path)
    assert not first.report.reused_ihvp

    def fail(*args, **kwargs):
        raise AssertionError("solved again")

    monkeypatch.setattr(Solver, "solve", fail)
    with pytest.raises(AssertionError, match="solved again"):
        fi.Influence(model, train, val, params="all", **OPTIONS)  # the patch bites
    second = fi.Influence(model, train, val, params="all", **OPTIONS, out=tmp_path)
    assert second.report.reused_ihvp
    assert second.report.solve == first.report.solve
    assert torch.equal(second.ihvp, first.ihvp)
    assert torch.equal(second.scores(), first.scores())


def test_auto_and_the_choice_it_resolves_to_share_a_directory(tmp_path):
    model, train, val = make_problem("mlp")
    first = fi.Influence(model, train, val, params="all", out=tmp_path, **OPTIONS)
    assert first.report.hessian == "gauss-newton"  # what "auto" resolves to for networks
    named = fi.Influence(model, train, val, params="all", hessian="gauss-newton", out=tmp_path,
                         **OPTIONS)
    assert named.report.reused_ihvp
    with pytest.raises(fi.SettingsMismatchError, match="options.hessian: 'gauss-newton' in "
                                                       "the directory vs 'exact' now"):
        fi.Influence(model, train, val, params="all", hessian="exact", out=tmp_path, **OPTIONS)


def test_a_non_writing_rank_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sharded_output, "is_writer", lambda group=None: False)
    model, train, val = make_problem("mlp")
    influence = fi.Influence(model, train, val, params="all", **OPTIONS, out=tmp_path)
    written = influence.scores(out=tmp_path, chunk_size=7)
    assert relative_error(written, influence.scores()) <= 1e-12
    assert not list(tmp_path.iterdir())


KILLED_RUN = """
import os, signal, sys
import numpy as np
import torch
from problems import make_problem
import fastinfluence as fi

torch.set_num_threads(1)
out, kill_at = sys.argv[1], int(sys.argv[2])
saved = []
original = np.save

def save_then_die(handle, array, **kwargs):
    # Dies after `kill_at` chunks, half-way through writing the next one.
    if "scores-" in handle.name:
        if len(saved) == kill_at:
            handle.write(b"\\x93NUMPY half a chunk")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        saved.append(handle.name)
    original(handle, array, **kwargs)

np.save = save_then_die
model, train, val = make_problem("mlp")
influence = fi.Influence(model, train, val, params="all", solver="direct", damping=0.5, out=out)
influence.scores(out=out, chunk_size=6)
"""


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_files(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(killed), "2"],
                         env=environment, capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    assert chunk_files(killed) == ["scores-00000.npy", "scores-00001.npy"]
    assert (killed / "scores-00002.npy.tmp").exists()  # killed mid-write: never renamed

    model, train, val = make_problem("mlp")
    resumed = fi.Influence(model, train, val, params="all", out=killed, **OPTIONS)
    assert resumed.report.reused_ihvp
    calls = count_rows(resumed)
    result = resumed.scores(out=killed, chunk_size=6)
    assert calls == [6, 6, 6, 6, 4]  # chunks 2–6; 0 and 1 were finished
    assert not list(killed.glob("*.tmp"))

    uninterrupted = fi.Influence(model, train, val, params="all", out=whole, **OPTIONS)
    assert torch.equal(uninterrupted.scores(out=whole, chunk_size=6), result)
    assert chunk_files(killed) == chunk_files(whole)
    for name in [*chunk_files(whole), sharded_output.IHVP_FILE]:
        assert (killed / name).read_bytes() == (whole / name).read_bytes(), name


def test_a_bfloat16_model_writes_its_float32_computation(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).to(torch.bfloat16)
    x = torch.randn(12, 4, dtype=torch.bfloat16)
    y = torch.randint(0, 3, (12,))
    influence = fi.Influence(model, (x, y), (x, y), **OPTIONS)
    maps = influence.perturbation(x, y, out=tmp_path, chunk_size=5)
    assert maps.dtype == torch.bfloat16
    assert torch.equal(maps, influence.perturbation(x, y))
    stored = np.load(tmp_path / "perturbation-00000.npy")
    assert stored.dtype == np.float32
    assert torch.equal(torch.from_numpy(stored).to(torch.bfloat16), maps[:5])


def cross_entropy_of_halved_logits(out, y):
    return torch.nn.functional.cross_entropy(out / 2, y, reduction="none")


def weighted_lambda(weight):
    return lambda out, y: torch.nn.functional.cross_entropy(out, y, weight=weight,
                                                            reduction="none")


class TemperatureLoss(torch.nn.Module):
    """Cross-entropy at a class-level temperature: its instances carry no state of their own,
    so only the probe tells two temperatures apart."""

    temperature = 1.0

    def forward(self, out, y):
        return torch.nn.functional.cross_entropy(out / self.temperature, y, reduction="none")


def class_weights(last: float) -> torch.Tensor:
    return torch.tensor([1.0, 1.0, last], dtype=torch.float64)


def cross_entropy(**options):
    return torch.nn.CrossEntropyLoss(reduction="none", **options)


# (keyword, what it was, what it is now): each change changes the scores.
OTHER_CALLABLES = {
    "class weight": ("loss_fn", lambda: cross_entropy(weight=class_weights(1.0)),
                     lambda: cross_entropy(weight=class_weights(3.0))),
    "label smoothing": ("loss_fn", lambda: cross_entropy(),
                        lambda: cross_entropy(label_smoothing=0.1)),
    "another lambda": ("loss_fn",
                       lambda: lambda out, y: torch.nn.functional.cross_entropy(
                           out, y, reduction="none"),
                       lambda: lambda out, y: torch.nn.functional.cross_entropy(
                           out / 2, y, reduction="none")),
    "weight in a closure": ("loss_fn", lambda: weighted_lambda(class_weights(1.0)),
                            lambda: weighted_lambda(class_weights(3.0))),
    "output selector": ("output", lambda: lambda out: out, lambda: lambda out: 2 * out),
}


@pytest.mark.parametrize("change", OTHER_CALLABLES)
def test_another_loss_or_output_selector_is_refused(tmp_path, change):
    keyword, before, after = OTHER_CALLABLES[change]
    model, train, val = make_problem("mlp")
    options = {"params": "all", **OPTIONS}
    first = fi.Influence(model, train, val, out=tmp_path, **{keyword: before()}, **options)
    first.scores(out=tmp_path, chunk_size=16)
    changed = fi.Influence(model, train, val, **{keyword: after()}, **options)
    assert relative_error(changed.scores(), first.scores()) > 1e-3  # the change matters
    with pytest.raises(fi.SettingsMismatchError, match=rf"options\.{keyword}\."):
        fi.Influence(model, train, val, out=tmp_path, **{keyword: after()}, **options)
    with pytest.raises(fi.SettingsMismatchError, match=rf"options\.{keyword}\."):
        changed.scores(out=tmp_path, chunk_size=16)


def test_a_loss_that_behaves_otherwise_is_refused_by_its_probe(tmp_path, monkeypatch):
    model, train, val = make_problem("mlp")
    fi.Influence(model, train, val, params="all", loss_fn=TemperatureLoss(), out=tmp_path,
                 **OPTIONS)
    monkeypatch.setattr(TemperatureLoss, "temperature", 2.0)
    with pytest.raises(fi.SettingsMismatchError,
                       match=r"options\.loss_fn\.probe\.values: other values on the probe"):
        fi.Influence(model, train, val, params="all", loss_fn=TemperatureLoss(), out=tmp_path,
                     **OPTIONS)


def squared_error(out, y):
    return (out[:, 0] - y) ** 2


@pytest.mark.parametrize("rebuilt", ["module", "lambda", "partial", "regression"])
def test_the_same_loss_built_again_reuses_s(tmp_path, rebuilt):
    model, train, val = make_problem("mlp")
    if rebuilt == "module":
        def build():
            return cross_entropy(weight=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
                                 label_smoothing=0.1)
    elif rebuilt == "lambda":  # two lambdas alike, of other qualified names
        build = iter([lambda out, y: torch.nn.functional.cross_entropy(out / 2, y,
                                                                        reduction="none"),
                      cross_entropy_of_halved_logits]).__next__
    elif rebuilt == "partial":
        def build():
            return functools.partial(torch.nn.functional.cross_entropy, reduction="none",
                                     label_smoothing=0.2)
    else:  # a regression: float labels shaped like the training labels, one output
        model = torch.nn.Linear(5, 1).double()
        train = (train[0], train[0].sum(dim=1))
        val = (val[0], val[0].sum(dim=1))
        build = iter([squared_error, lambda out, y: (out[:, 0] - y) ** 2]).__next__
    first = fi.Influence(model, train, val, params="all", loss_fn=build(), out=tmp_path,
                         **OPTIONS)
    written = first.scores(out=tmp_path, chunk_size=16)
    again = fi.Influence(model, train, val, params="all", loss_fn=build(), out=tmp_path,
                         **OPTIONS)
    assert again.report.reused_ihvp
    calls = count_rows(again)
    assert torch.equal(again.scores(out=tmp_path, chunk_size=16), written)
    assert calls == []


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[:len(data) // 2]))
    else:  # one bit of the last value flipped
        data[-1] ^= 1
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_chunk_is_computed_again(tmp_path, how):
    model, train, val = make_problem("mlp")
    influence = fi.Influence(model, train, val, params="all", out=tmp_path, **OPTIONS)
    expected = influence.scores(out=tmp_path, chunk_size=7)
    damage(tmp_path / "scores-00002.npy", how)
    with pytest.raises(ValueError, match=r"scores-00002\.npy: .*rerun with the same settings"):
        fi.read_output(tmp_path, "scores")
    again = fi.Influence(model, train, val, params="all", out=tmp_path, **OPTIONS)
    calls = count_rows(again)
    with pytest.warns(UserWarning, match=r"scores-00002\.npy is damaged"):
        assert torch.equal(again.scores(out=tmp_path, chunk_size=7), expected)
    assert calls == [7]
    assert torch.equal(fi.read_output(tmp_path, "scores"), expected)


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_a_damaged_s_is_solved_again(tmp_path, how):
    model, train, val = make_problem("mlp")
    first = fi.Influence(model, train, val, params="all", out=tmp_path, **OPTIONS)
    first.scores(out=tmp_path, chunk_size=16)
    damage(tmp_path / sharded_output.IHVP_FILE, how)
    with pytest.warns(UserWarning, match=r"ihvp\.npy is damaged"):
        again = fi.Influence(model, train, val, params="all", out=tmp_path, **OPTIONS)
    assert not again.report.reused_ihvp
    assert torch.equal(again.ihvp, first.ihvp)
    assert torch.equal(again.scores(out=tmp_path, chunk_size=16), first.scores())
    assert fi.Influence(model, train, val, params="all", out=tmp_path,
                        **OPTIONS).report.reused_ihvp  # the file was written again


def test_a_directory_of_the_first_format_is_refused_clearly(tmp_path):
    model, train, val = make_problem("mlp")
    fi.Influence(model, train, val, params="all", out=tmp_path, **OPTIONS).scores(out=tmp_path)
    manifest = json.loads((tmp_path / sharded_output.MANIFEST).read_text())
    old = {"format": 1, "settings": {**manifest["settings"], "options": {
        **manifest["settings"]["options"], "loss_fn": None, "output": None}},
        "ihvp": manifest["ihvp"], "outputs": manifest["outputs"]}
    (tmp_path / sharded_output.MANIFEST).write_text(json.dumps(old))
    for attempt in (lambda: fi.Influence(model, train, val, params="all", out=tmp_path,
                                         **OPTIONS),
                    lambda: fi.read_output(tmp_path, "scores")):
        with pytest.raises(fi.SettingsMismatchError, match="another version of fastinfluence "
                                                           r"\(manifest format 1"):
            attempt()


def test_another_batch_size_reuses_s(tmp_path):
    model, train, val = make_problem("mlp")
    first = fi.Influence(model, train, val, out=tmp_path / "tensors", batch_size=3, **OPTIONS)
    again = fi.Influence(model, train, val, out=tmp_path / "tensors", batch_size=40, **OPTIONS)
    assert again.report.reused_ihvp
    assert torch.equal(again.ihvp, first.ihvp)
    dataset = torch.utils.data.TensorDataset(*train)
    for loader_batch_size in (6, 16):
        loader = torch.utils.data.DataLoader(dataset, batch_size=loader_batch_size)
        again = fi.Influence(model, loader, val, out=tmp_path / "loader", **OPTIONS)
    assert again.report.reused_ihvp


def scaled(scale):
    return lambda out, y: torch.nn.functional.cross_entropy(out / scale, y, reduction="none")


def test_the_state_of_a_callable_tells_apart_what_changes_it():
    describe = fingerprints.describe_callable
    alike = [lambda out: out * 2, lambda out: out * 2]  # two lambdas written alike
    assert describe(alike[0]) == describe(alike[1])
    assert describe(scaled(np.float32(2.0))) == describe(scaled(np.float32(2.0)))
    assert describe(cross_entropy(weight=class_weights(3.0))) == describe(
        cross_entropy(weight=class_weights(3.0)))
    others = [
        (lambda out: out * 2, lambda out: out * 3),
        (scaled(np.float32(2.0)), scaled(np.float32(3.0))),
        (scaled(np.array([1.0, 2.0])), scaled(np.array([1.0, 3.0]))),
        (functools.partial(torch.nn.functional.cross_entropy, label_smoothing=0.1),
         functools.partial(torch.nn.functional.cross_entropy, label_smoothing=0.2)),
        (cross_entropy(ignore_index=0), cross_entropy(ignore_index=1)),
        (cross_entropy(weight=class_weights(1.0)), cross_entropy(weight=class_weights(3.0))),
        (torch.nn.Sequential(cross_entropy()), torch.nn.Sequential(cross_entropy(
            label_smoothing=0.1))),
    ]
    for before, after in others:
        assert describe(before) != describe(after), (before, after)
