"""The experiment harness of the ``examples/`` scripts (never imported by the engine).

An example declares its settings once (:func:`setting`: the CPU default, the paper's value
for ``--full`` and the flag's help), and :class:`ExperimentCLI` generates its command line
from them with the flags every example shares. A :class:`Session` runs the example's jobs
and writes every finished run into one JSON file together with the settings it ran with; a
rerun with the same settings loads the finished runs and does only the rest, and a rerun
with other settings is refused (or starts afresh with ``--fresh``). Files are written to a
temporary name and renamed, so an interrupted write never leaves a broken file. The table
is rendered from that file alone, so a committed table regenerates from its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm


def load_saved(path: Path, settings: Any, fresh: bool,
               extendable: tuple[str, ...] = ()) -> dict[str, Any]:
    """What ``path`` holds (``settings``, ``runs`` and whatever else the example saved), after
    checking that its settings equal ``settings`` (a dataclass) except in the fields named in
    ``extendable``, which the caller merges; ``{}`` when there is no file or ``fresh``. A
    field with a default that the saved settings lack (one added after they were saved)
    counts as that default.

    Raises ``SystemExit`` naming every other setting that differs (saved value, then this
    command's).
    """
    if fresh or not path.exists():
        return {}
    saved = json.loads(path.read_text())
    defaults = {f.name: f.default for f in fields(settings) if f.default is not MISSING}
    theirs = json.loads(json.dumps(defaults)) | (saved.get("settings") or {})
    mine = json.loads(json.dumps(asdict(settings)))
    differ = [f"{name} ({theirs.get(name, 'absent')!r} there, {mine.get(name, 'absent')!r} "
              f"here)" for name in dict.fromkeys([*mine, *theirs])
              if name not in extendable and theirs.get(name, ...) != mine.get(name, ...)]
    if differ:
        only = (f" Only {' and '.join('--' + name.replace('_', '-') for name in extendable)} can "
                f"extend it;" if extendable else "")
        raise SystemExit(
            f"{path} holds runs made with other settings: {'; '.join(differ)}.{only} pass "
            f"--fresh to discard its runs or choose another --out"
        )
    return saved


def save_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file, then a rename)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(_json_text(payload) + "\n")
    temporary.replace(path)


def _json_text(value: Any, depth: int = 0) -> str:
    """``value`` as JSON indented by one space per level, except that a list of numbers or
    strings stays on one line (per-sample lists would otherwise take a line per number)."""
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(str(k))}: {_json_text(v, depth + 1)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return "[\n" + ",\n".join(inner + _json_text(v, depth + 1) for v in value) + f"\n{pad}]"
    return json.dumps(value)


def percent_cell(values: list[float], digits: int = 2) -> str:
    """``mean ± std`` of fractions, in percent, for a table cell (``–`` when empty)."""
    if not values:
        return "–"
    return f"{100 * np.mean(values):.{digits}f} ± {100 * np.std(values):.{digits}f}"


# -- settings that generate the command line ---------------------------------------------------

_SAME = object()
_SETTING = "fastinfluence.experiments.setting"


@dataclass(frozen=True)
class _Setting:
    default: Any
    paper: Any
    help: str
    flag: str | None
    argument: dict[str, Any]
    normalise: Callable[[Any], Any] | None


def setting(default: Any, paper: Any = _SAME, *, help: str = "", flag: str | None = "",
            normalise: Callable[[Any], Any] | None = None, absent: Any = MISSING,
            **argument: Any) -> Any:
    """A field of an example's settings dataclass: its CPU default, its ``--full`` (paper)
    value and the command-line flag that overrides both.

    Args:
        default: the value without ``--full``; or a function of the settings resolved so far
            (the fields declared above it, and ``full``), for values derived from others.
        paper: the value with ``--full`` (a value or such a function); omitted: ``default``.
        help: the flag's help; ``(default X; --full Y)`` is appended when both are values
            (not for a ``bool``, whose flag says what it changes).
        flag: the option string; ``""`` gives ``--`` and the name with dashes; ``None``: no
            flag (the field is always derived). A ``bool`` field's flag stores the opposite
            of its default (``--no-recalibrate-bn``).
        normalise: applied to the resolved value; lists are de-duplicated (first kept) when
            it is not given.
        absent: the value that a saved ``runs.json`` lacking this field (one written before
            the field existed) is taken to hold; it must then be the dataclass's last fields.
        argument: further :meth:`argparse.ArgumentParser.add_argument` keywords (``type``,
            ``nargs``, ``choices``, ``metavar``).
    """
    spec = _Setting(default, default if paper is _SAME else paper, help, flag, argument,
                    normalise)
    extra = {} if absent is MISSING else {"default": absent}
    return field(metadata={_SETTING: spec}, **extra)


def _described(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


class ExperimentCLI:
    """The command line of an example, generated from its settings dataclass (every field
    declared with :func:`setting`) plus the flags every example shares:

    ``--full`` (the paper's values), ``--out`` (the results folder), ``--fresh`` (discard its
    runs), ``--no-train`` (write the table and figures from the saved runs only), ``--shard
    K/N`` (run the jobs K, K+N, ... of the list), ``--merge OUT...`` (first add the runs of
    other folders), ``--threads``, ``--device`` and ``--progress/--no-progress``.

    Args:
        settings_type: the dataclass (saved in ``runs.json``; resuming needs equality).
        doc: the example's module docstring (its first paragraph is the description).
        script: the example's path, as its commands are written (``examples/x.py``).
        out: the default ``--out``, or a function of the settings giving it.
        extendable: settings that a later command may extend on a finished ``--out`` (lists:
            the union, saved values first; numbers: the larger).
        check: a function of the resolved settings returning an error message or ``None``.
        options: adds the example's own flags that are not settings (``add_argument``).
        scratch: folders of ``--out`` that ``--fresh`` empties with the runs.
    """

    def __init__(self, settings_type: type, doc: str, script: str,
                 out: Path | Callable[[Any], Path], *,
                 extendable: tuple[str, ...] = (),
                 check: Callable[[Any], str | None] | None = None,
                 options: Callable[[Callable[..., Any]], None] | None = None,
                 scratch: tuple[str, ...] = ()) -> None:
        self.settings_type, self.doc, self.script, self.out = settings_type, doc, script, out
        self.extendable, self.check, self.options, self.scratch = (extendable, check, options,
                                                                   scratch)
        self.specs = {f.name: f.metadata[_SETTING] for f in fields(settings_type)}

    def parser(self) -> argparse.ArgumentParser:
        """The argument parser: ``--full``, a flag per setting, then the shared flags."""
        parser = argparse.ArgumentParser(description=self.doc.split("\n\n")[0],
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        add = parser.add_argument
        add("--full", action="store_true",
            help="the paper's settings (flags given explicitly still win)")
        for name, spec in self.specs.items():
            if spec.flag is None:
                continue
            text = spec.help
            if not (callable(spec.default) or callable(spec.paper)
                    or isinstance(spec.default, bool)):
                shown = f"default {_described(spec.default)}"
                if spec.paper != spec.default:
                    shown += f"; --full {_described(spec.paper)}"
                text = f"{text} ({shown})" if text else shown
            flag = spec.flag or "--" + name.replace("_", "-")
            if isinstance(spec.default, bool):
                add(flag, dest=name, action="store_const", const=not spec.default, default=None,
                    help=text)
            else:
                add(flag, dest=name, default=None, help=text, **spec.argument)
        add("--out", type=Path, default=None, help="the results folder")
        add("--fresh", action="store_true", help="discard the runs already in --out")
        add("--no-train", action="store_true",
            help="train nothing: write the table and figures from the runs saved in --out")
        add("--shard", type=shard_spec, default=None, metavar="K/N",
            help="run only the jobs K, K+N, K+2N, ... (0-based) of the full list, to share the "
                 "work between processes or machines, each with its own copy of --out")
        add("--merge", type=Path, nargs="+", default=[], metavar="OUT",
            help="first add the runs of these --out folders (same settings, e.g. made by "
                 "--shard) that --out lacks, and their figure inputs")
        add("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        add("--device", default=None, help="default: cuda when available, else cpu")
        add("--progress", action=argparse.BooleanOptionalAction, default=True)
        if self.options is not None:
            self.options(add)
        return parser

    def parse_args(self, argv: list[str] | None = None) -> argparse.Namespace:
        """The parsed flags, with ``--out`` filled in; ``SystemExit`` when they resolve to
        settings that ``check`` refuses (:meth:`settings_from`)."""
        args = self.parser().parse_args(argv)
        settings = self.settings_from(args)
        if args.out is None:
            args.out = self.out(settings) if callable(self.out) else self.out
        return args

    def settings_from(self, args: argparse.Namespace) -> Any:
        """The settings: each field the flag's value when given, else its ``--full`` value
        with ``--full``, else its default; fields resolve in declaration order. Raises
        ``SystemExit`` with ``check``'s message."""
        known = argparse.Namespace(full=args.full)
        for name, spec in self.specs.items():
            value = getattr(args, name, None)
            if value is None:
                value = spec.paper if args.full else spec.default
                value = value(known) if callable(value) else value
            if spec.normalise is not None:
                value = spec.normalise(value)
            elif isinstance(value, list):
                value = list(dict.fromkeys(value))
            setattr(known, name, value)
        settings = self.settings_type(**{name: getattr(known, name) for name in self.specs})
        problem = self.check(settings) if self.check is not None else None
        if problem:
            raise SystemExit(f"{self.script}: error: {problem}")
        return settings

    def extend(self, settings: Any, first: dict[str, Any], then: dict[str, Any]) -> Any:
        """``settings`` with every extendable field the union of ``first``'s and ``then``'s
        (saved or ``asdict`` settings): lists in that order, numbers the larger."""
        return replace(settings, **{
            name: (list(dict.fromkeys([*first[name], *then[name]]))
                   if isinstance(first[name], list) else max(first[name], then[name]))
            for name in self.extendable})


def shard_spec(text: str) -> tuple[int, int]:
    """``"K/N"`` as ``(K, N)``, with ``0 <= K < N``."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N such as 0/2, got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"K/N needs 0 <= K < N, got {text!r}")
    return k, n


# -- one command's runs ------------------------------------------------------------------------


class Session:
    """One command of an example on its ``--out``: the saved runs it resumes (extended by
    ``--merge`` and, in the extendable settings, by the command), the run loop, and the
    writer of ``runs.json`` and ``table.md``.

    ``runs.json`` holds ``{"settings", "meta", "runs"}``; ``meta`` names the command that
    made the runs (``--no-train`` keeps the saved one: the table names who trained), the
    commands its runs extend or merged, and the machine; the example adds what its table
    reports. Both files are rewritten after every finished run (:meth:`save`).

    Args:
        cli: the example's :class:`ExperimentCLI`.
        argv: the arguments (``None``: ``sys.argv``).
        run_id: the identity of a run record (runs of equal identity are the same run).
        render: the table, from the settings, the runs and ``meta``.
    """

    def __init__(self, cli: ExperimentCLI, argv: list[str] | None,
                 run_id: Callable[[dict[str, Any]], Any],
                 render: Callable[[Any, list[dict[str, Any]], dict[str, Any]], str]) -> None:
        self.cli, self.run_id, self.render = cli, run_id, render
        self.args = args = cli.parse_args(argv)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        self.device: str = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        settings = cli.settings_from(args)
        self.out: Path = args.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.runs_path = self.out / "runs.json"
        saved = load_saved(self.runs_path, settings, args.fresh, cli.extendable)
        if args.fresh:
            for folder in cli.scratch:
                shutil.rmtree(self.out / folder, ignore_errors=True)
        self.runs: list[dict[str, Any]] = saved.get("runs", [])
        if saved:
            settings = cli.extend(settings, saved["settings"], asdict(settings))
        self.settings = settings
        merged = self._merge(args.merge)
        command = shlex.join(["python", *sys.argv] if argv is None
                             else ["python", cli.script, *argv])
        saved_meta = saved.get("meta", {})
        earlier = [*saved_meta.get("earlier_commands", []), saved_meta.get("command", command),
                   *merged]
        self.meta: dict[str, Any] = {
            "command": command,
            "earlier_commands": [c for c in dict.fromkeys(earlier) if c != command],
            "machine": f"{platform.machine()} {os.cpu_count()} cores, "
                       f"{torch.get_num_threads()} threads, {self.device}, "
                       f"torch {torch.__version__}",
        }
        if args.no_train and saved_meta:
            self.meta = {**saved_meta, "earlier_commands": [
                c for c in dict.fromkeys([*saved_meta.get("earlier_commands", []), *merged])
                if c != saved_meta.get("command")]}
        self._done = {self.run_id(r) for r in self.runs}
        self._total: int | None = None
        if args.merge:
            self._write_runs()

    def _merge(self, others: list[Path]) -> list[str]:
        """Add the runs of the ``others`` that this ``--out`` lacks (and the files of their
        scratch folders it lacks); returns the commands that made them."""
        known = {self.run_id(r) for r in self.runs}
        commands: list[str] = []
        for other in others:
            saved = load_saved(other / "runs.json", self.settings, False, self.cli.extendable)
            if not saved:
                raise SystemExit(f"--merge {other}: there is no runs.json to merge")
            self.settings = self.cli.extend(self.settings, asdict(self.settings),
                                            saved["settings"])
            self.runs += [r for r in saved["runs"] if self.run_id(r) not in known]
            known |= {self.run_id(r) for r in saved["runs"]}
            meta = saved.get("meta", {})
            commands += meta.get("earlier_commands", [])
            if "command" in meta:
                commands.append(meta["command"])
            for folder in self.cli.scratch:
                for path in sorted((other / folder).glob("*")):
                    target = self.out / folder / path.name
                    if path.is_file() and not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(path, target)
        return commands

    def done(self, run_id: Any) -> bool:
        """Whether a run of this identity is saved."""
        return run_id in self._done

    def record(self, run_id: Any) -> dict[str, Any] | None:
        """The saved run of this identity, if any."""
        return next((r for r in self.runs if self.run_id(r) == run_id), None)

    def save(self, record: dict[str, Any]) -> None:
        """Keep a finished run: rewrite ``runs.json`` and ``table.md``."""
        self.runs.append(record)
        self._done.add(self.run_id(record))
        self.write()

    def _write_runs(self) -> None:
        save_json(self.runs_path, {"settings": asdict(self.settings), "meta": self.meta,
                                   "runs": self.runs})

    def write(self) -> Path:
        """Write ``runs.json`` and ``table.md`` (the table of what ``runs.json`` holds)."""
        if not self.args.no_train:
            self._write_runs()
        path = self.out / "table.md"
        path.write_text(self.render(self.settings, self.runs, self.meta))
        return path

    def run(self, jobs: list[Any], work: Callable[[Any], None], describe: Callable[[Any], str],
            *, desc: str, unit: str = "run", one_run_per_job: bool = True) -> None:
        """``work(job)`` for every job (those of ``--shard`` only; none with ``--no-train``)
        under a progress bar; ``work`` skips what is :meth:`done` and :meth:`save`\\ s each
        run it finishes. ``one_run_per_job``: an interruption reports the runs out of
        ``len(jobs)``."""
        self._total = len(jobs) if one_run_per_job else None
        if self.args.shard is not None:
            jobs = jobs[self.args.shard[0]::self.args.shard[1]]
        if self.args.no_train:
            jobs = []
        with tqdm(jobs, desc=desc, unit=unit, disable=not self.args.progress) as bar:
            for job in bar:
                bar.set_postfix_str(describe(job))
                work(job)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: Any) -> None:
        """Ctrl-C inside ``with session:`` keeps every finished run (each was saved as it
        finished) and exits with code 130 after one line instead of a traceback."""
        if kind is KeyboardInterrupt:
            counted = "" if self._total is None else f" of {self._total}"
            print(f"interrupted: {len(self.runs)}{counted} runs are saved in {self.runs_path}; "
                  f"the same command resumes from there", file=sys.stderr)
            raise SystemExit(130) from None

    def finish(self, figures: list[Path]) -> None:
        """Write the table, print it and name every file written."""
        table = self.write()
        print(table.read_text())
        for path in [self.runs_path, table, *figures]:
            print(f"wrote {path}")


def save_figure(figure: Any, path: Path, dpi: int) -> Path:
    """Lay out a matplotlib ``Figure`` tightly and save it as ``path``."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    return path


def regenerate_table(out: Path, settings_type: type,
                     render: Callable[[Any, list[dict[str, Any]], dict[str, Any]], str]) -> str:
    """The table of the runs saved in ``out/runs.json``, as the command that made them wrote
    it (the committed tables are checked against this)."""
    saved = json.loads((out / "runs.json").read_text())
    return render(settings_type(**saved["settings"]), saved["runs"], saved["meta"])


def save_tensors(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically (a temporary file, then a rename),
    creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


def format_markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the ``header`` cells, a separator, then one line per row of cells."""
    lines = [header, *rows]
    return "\n".join(["| " + " | ".join(lines[0]) + " |", "|---" * len(header) + "|",
                      *("| " + " | ".join(cells) + " |" for cells in lines[1:])])
