"""Resumable experiment records, shared by the ``examples/`` scripts.

An example writes every finished run into one JSON file together with the settings it ran
with; a rerun with the same settings loads the finished runs and does only the rest, and a
rerun with other settings is refused (or starts afresh with ``--fresh``). Files are written
to a temporary name and renamed, so an interrupted write never leaves a broken file.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, fields
from pathlib import Path
from typing import Any

import numpy as np


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


def load_runs(path: Path, settings: Any, fresh: bool) -> list[dict[str, Any]]:
    """The runs saved in ``path`` for ``settings`` (a dataclass); ``[]`` when there is no file
    or ``fresh``; ``SystemExit`` naming the differences when the file holds runs of other
    settings (:func:`load_saved`)."""
    return load_saved(path, settings, fresh).get("runs", [])


def save_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (a temporary file, then a rename)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    temporary.replace(path)


def percent_cell(values: list[float], digits: int = 2) -> str:
    """``mean ± std`` of fractions, in percent, for a table cell (``–`` when empty)."""
    if not values:
        return "–"
    return f"{100 * np.mean(values):.{digits}f} ± {100 * np.std(values):.{digits}f}"
