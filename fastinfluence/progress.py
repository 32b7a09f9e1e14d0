"""Progress bars for long work (tqdm), off unless asked for.

On a terminal each stage is a tqdm bar, nested stages (the products inside each CG iteration)
as bars below it. When standard error is not a terminal (a log file, a pipe, a batch job) a bar
would write a line per refresh, so each outermost stage writes one line when it ends instead
(what, how many items, seconds) and the stages nested in it write nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_open_stages = 0
"""Stages running now (nested ones included), so that only the outermost writes its line."""


def progress_bar(items: Iterable[T], enabled: bool, description: str,
                 total: int | None = None) -> Iterator[T]:
    """``items`` wrapped in a tqdm bar when ``enabled`` and standard error is a terminal, in a
    one-line summary of the outermost stage when it is not, else unchanged."""
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, desc=description, total=total, leave=False)
        return
    global _open_stages
    outermost = _open_stages == 0
    _open_stages += 1
    start = time.perf_counter()
    count = 0
    try:
        for item in items:
            yield item
            count += 1
    except GeneratorExit:
        pass  # the caller stopped early (CG converged): the stage is over all the same
    finally:
        _open_stages -= 1
    if outermost:
        print(f"{description}: {count} in {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)
