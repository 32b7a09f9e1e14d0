"""``python -m fastinfluence score`` on a tiny saved model (``cli_models``): its output equals
the library's, reruns resume, every input error is clear, and it runs under a torchrun
environment."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_models import halved, squared_error, tiny_image_model, tiny_mlp
from problems import relative_error

import fastinfluence as fi
from fastinfluence.cli import main
from fastinfluence.score_command import load_data
from fastinfluence.sharded_output import read_output

TESTS = Path(__file__).parent


@pytest.fixture
def saved(tmp_path):
    """A tiny MLP's checkpoint (inside a dict, as training scripts save it), train as a
    ``.pt`` (X, y) pair and val as ``.npy`` inputs with ``.pt`` labels."""
    torch.manual_seed(0)
    model = tiny_mlp()
    generator = torch.Generator().manual_seed(1)
    train = (torch.randn(30, 5, generator=generator, dtype=torch.float64),
             torch.randint(0, 3, (30,), generator=generator))
    val = (torch.randn(8, 5, generator=generator, dtype=torch.float64),
           torch.randint(0, 3, (8,), generator=generator))
    paths = {name: tmp_path / name for name in
             ("model.pt", "train.pt", "val_x.npy", "val_y.pt")}
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, paths["model.pt"])
    torch.save(train, paths["train.pt"])
    np.save(paths["val_x.npy"], val[0].numpy())
    torch.save(val[1], paths["val_y.pt"])
    return model, train, val, paths


def arguments(paths, out, *extra):
    return ["score", "--model", "cli_models:tiny_mlp", "--checkpoint", str(paths["model.pt"]),
            "--train", str(paths["train.pt"]), "--val", str(paths["val_x.npy"]),
            "--val-labels", str(paths["val_y.pt"]), "--out", str(out), "--params", "all",
            "--damping", "0.5", "--solver", "cg", "--option", "tol=1e-12",
            "--option", "max_iter=500", "--chunk-size", "7", "--no-progress", *extra]


def test_scores_and_self_influence_equal_the_library(saved, tmp_path, capsys):
    model, train, val, paths = saved
    out = tmp_path / "out"
    assert main(arguments(paths, out)) == 0
    assert "scores of 30 samples written" in capsys.readouterr().out
    influence = fi.Influence(model, train, val, params="all", damping=0.5, solver="cg",
                             tol=1e-12, max_iter=500)
    assert relative_error(read_output(out, "scores"), influence.scores()) <= 1e-12
    assert len(list(out.glob("scores-*.npy"))) == 5

    assert main(arguments(paths, out, "--what", "self-influence")) == 0
    printed = capsys.readouterr().out
    assert "s reused from out" in printed
    assert relative_error(read_output(out, "self-influence"),
                          influence.self_influence()) <= 1e-10  # CG's tolerance, per chunk


def test_a_rerun_with_other_settings_is_refused(saved, tmp_path, capsys):
    _, _, _, paths = saved
    out = tmp_path / "out"
    assert main(arguments(paths, out)) == 0
    with pytest.raises(SystemExit) as exited:
        main(arguments(paths, out, "--damping", "0.25"))
    assert exited.value.code != 0
    assert "options.damping: 0.5 in the directory vs 0.25 now" in capsys.readouterr().err


def test_image_folder(tmp_path, capsys):
    image = pytest.importorskip("PIL.Image")
    generator = np.random.default_rng(0)
    for split, classes in (("train", ("benign", "malignant")), ("val", ("malignant",))):
        for label in classes:
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for index in range(3):
                pixels = generator.integers(0, 256, (4, 4), dtype=np.uint8)
                image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    torch.manual_seed(0)
    model = tiny_image_model()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    argv = ["score", "--model", "cli_models:tiny_image_model", "--checkpoint",
            str(tmp_path / "model.pt"), "--train", str(tmp_path / "train"), "--val",
            str(tmp_path / "val"), "--image-mode", "L", "--out", str(out), "--no-progress"]
    assert main(argv) == 0

    def load(split):
        xs, ys = [], []
        for label, name in enumerate(("benign", "malignant")):
            for index in range(3 if (tmp_path / split / name).exists() else 0):
                with image.open(tmp_path / split / name / f"{index}.png") as file:
                    xs.append(torch.tensor(np.asarray(file), dtype=torch.float64)[None] / 255)
                ys.append(label)
        return torch.stack(xs), torch.tensor(ys)

    train, val = load("train"), load("val")
    assert val[1].tolist() == [1, 1, 1]  # the training folder's labels, not shifted
    expected = fi.Influence(model, train, val).scores()
    assert relative_error(read_output(out, "scores"), expected) <= 1e-6  # float32 pixels

    (tmp_path / "val" / "other").mkdir()
    message = error_of(capsys, [*argv[:-3], "--out", str(tmp_path / "out2"), "--no-progress"])
    assert "--val: image folder" in message and "classes ['other']" in message


def error_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_a_missing_file_is_named(saved, tmp_path, capsys):
    _, _, _, paths = saved
    argv = arguments(paths, tmp_path / "out")
    argv[argv.index("--train") + 1] = str(tmp_path / "absent.pt")
    assert "--train: no such file or directory" in error_of(capsys, argv)
    argv = arguments(paths, tmp_path / "out")
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "absent.pt")
    assert "--checkpoint: no such file or directory" in error_of(capsys, argv)


def test_a_checkpoint_that_does_not_fit_is_explained(saved, tmp_path, capsys):
    _, _, _, paths = saved
    torch.save(tiny_mlp(hidden=6).state_dict(), paths["model.pt"])
    message = error_of(capsys, arguments(paths, tmp_path / "out"))
    assert "does not fit the model" in message
    assert "0.weight: (6, 5) in the checkpoint vs (8, 5) in the model" in message
    state = tiny_mlp().state_dict()
    state["extra"] = state.pop("2.bias")
    torch.save(state, paths["model.pt"])
    message = error_of(capsys, arguments(paths, tmp_path / "out"))
    assert "missing keys ['2.bias']" in message and "unexpected keys ['extra']" in message
    paths["model.pt"].write_text("not a checkpoint")
    assert "--checkpoint: cannot read" in error_of(capsys, arguments(paths, tmp_path / "out"))


def test_data_the_model_cannot_take_is_named(saved, tmp_path, capsys):
    _, train, _, paths = saved
    torch.save((train[0][:, :4], train[1]), paths["train.pt"])
    message = error_of(capsys, arguments(paths, tmp_path / "out"))
    assert "--train: the model cannot take these inputs" in message
    assert "shape (2, 4)" in message


def test_other_input_errors_come_before_work(saved, tmp_path, capsys):
    _, _, _, paths = saved
    argv = arguments(paths, tmp_path / "out")
    del argv[argv.index("--val-labels"):argv.index("--val-labels") + 2]
    message = error_of(capsys, argv)
    assert "--val: " in message and "holds only inputs; give the labels with --val-labels" \
        in message
    message = error_of(capsys, arguments(paths, tmp_path / "out", "--model",
                                         "cli_models:absent"))
    assert "--model: module 'cli_models' has no attribute 'absent'" in message
    message = error_of(capsys, arguments(paths, tmp_path / "out", "--option", "bogus=1"))
    assert "unknown keyword argument(s) ['bogus']" in message
    assert not (tmp_path / "out").exists()


def test_option_values_of_the_wrong_type_are_usage_errors(saved, tmp_path, capsys):
    _, _, _, paths = saved
    out = tmp_path / "out"
    message = error_of(capsys, arguments(paths, out, "--option", "tol=abc"))
    assert "--option tol=abc: tol must be a finite number > 0, got 'abc'" in message
    assert "Traceback" not in message
    message = error_of(capsys, arguments(paths, out, "--option", "max_iter=1.5"))
    assert "--option max_iter=1.5: max_iter must be an integer >= 1, got 1.5" in message
    message = error_of(capsys, arguments(paths, out, "--model-kwargs", '{"width": 4}'))
    assert "--model-kwargs: cli_models:tiny_mlp(**{'width': 4}) failed" in message
    assert "'width'" in message
    message = error_of(capsys, arguments(paths, out, "--option", "scale=2"))  # with --solver cg
    assert "--option scale=2: unknown option(s) ['scale'] for solver='cg'" in message
    message = error_of(capsys, arguments(paths, out, "--params", "0,bogus"))
    assert "--params: no module or parameter named 'bogus'" in message
    assert "--device: " in error_of(capsys, arguments(paths, out, "--device", "abacus"))
    assert not out.exists()


def test_loss_and_output_selector_from_the_command_line(saved, tmp_path, capsys):
    model, train, val, paths = saved
    out = tmp_path / "out"
    chosen = ("--loss", "cli_models:squared_error", "--output", "cli_models:halved")
    assert main(arguments(paths, out, *chosen)) == 0
    influence = fi.Influence(model, train, val, loss_fn=squared_error, output=halved,
                             params="all", damping=0.5, solver="cg", tol=1e-12, max_iter=500)
    assert relative_error(read_output(out, "scores"), influence.scores()) <= 1e-12
    default = fi.Influence(model, train, val, params="all", damping=0.5, solver="cg",
                           tol=1e-12, max_iter=500)
    assert relative_error(influence.scores(), default.scores()) > 0.1  # they were used

    other = tmp_path / "other"
    message = error_of(capsys, arguments(paths, other, "--loss", "cli_models:absent"))
    assert "--loss: module 'cli_models' has no attribute 'absent'" in message
    message = error_of(capsys, arguments(paths, other, "--output", "cli_models"))
    assert "--output must be pkg.module:callable, got 'cli_models'" in message
    message = error_of(capsys, arguments(paths, other, "--loss", "cli_models:mean_squared_error"))
    assert "--loss must return one loss per sample, shape (2,) on two samples of --train; " \
        "got ()" in message
    message = error_of(capsys, arguments(paths, other, "--output", "cli_models:tiny_mlp"))
    assert "--output: cannot select from the model's output on --train" in message
    assert not other.exists()


def test_progress_is_one_line_per_stage_when_stderr_is_not_a_terminal(saved, tmp_path, capsys):
    _, _, _, paths = saved
    argv = arguments(paths, tmp_path / "out")
    argv.remove("--no-progress")
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines, "no progress at all"
    stages = [re.fullmatch(r"(.+): (\d+) in \d+\.\d s", line) for line in lines]
    assert all(stages), lines
    # the solve, its true-residual check, the scores (30 samples in chunks of 7); the products
    # inside each CG iteration are stages of the solve and write nothing
    assert [stage[1] for stage in stages] == ["CG", "Hessian-vector product", "scores chunks"]
    assert stages[-1][2] == "5"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_runs_under_a_torchrun_environment(saved, tmp_path):
    model, train, val, paths = saved
    out = tmp_path / "out"
    environment = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                   "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
                       [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    script = ("import sys, torch.distributed as d; from fastinfluence.cli import main; "
              "status = main(sys.argv[1:]); assert not d.is_initialized(); sys.exit(status)")
    run = subprocess.run([sys.executable, "-c", script, *arguments(paths, out)],
                         env=environment, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "torch.distributed gloo, 1 rank" in run.stdout
    influence = fi.Influence(model, train, val, params="all", damping=0.5, solver="cg",
                             tol=1e-12, max_iter=500)
    assert relative_error(read_output(out, "scores"), influence.scores()) <= 1e-12


@pytest.mark.slow
def test_torchrun_with_two_ranks_writes_once(saved, tmp_path):
    model, train, val, paths = saved
    out = tmp_path / "out"
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    # CG capped at 3 iterations: every rank runs the same solve, which warns once, on rank 0.
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastinfluence", *arguments(paths, out, "--option", "max_iter=3")],
        env=environment, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("scores of 30 samples written") == 1  # rank 0 alone reports
    assert run.stderr.count("cg solve did not reach tol=1e-12") == 1, run.stderr[-3000:]
    assert "torch.distributed gloo, 2 rank(s)" in run.stdout
    assert not list(out.glob("*.tmp"))
    with pytest.warns(RuntimeWarning, match="cg solve did not reach"):
        influence = fi.Influence(model, train, val, params="all", damping=0.5, solver="cg",
                                 tol=1e-12, max_iter=3)
    assert relative_error(read_output(out, "scores"), influence.scores()) <= 1e-12


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="a private mapping shows later writes to its file on Linux")
def test_npy_data_is_memory_mapped_not_read_up_front(tmp_path):
    """An ``.npy`` larger than memory streams: its pages are read as batches read them (a
    write to the file after loading shows in the tensor, which a copy read up front would
    not)."""
    inputs, labels = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(inputs, np.zeros((4, 3)))
    np.save(labels, np.zeros(4, dtype=np.int64))
    x, y = load_data(inputs, labels, "--train", "RGB", None)
    with open(inputs, "r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        handle.write(np.float64(7.0).tobytes())
    assert float(x[-1, -1]) == 7.0 and x.shape == (4, 3) and y.tolist() == [0] * 4
