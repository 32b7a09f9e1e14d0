"""Progress bars for long work (tqdm), off unless asked for."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(items: Iterable[T], enabled: bool, description: str,
                 total: int | None = None) -> Iterator[T]:
    """``items`` wrapped in a tqdm bar when ``enabled``, else unchanged."""
    if not enabled:
        yield from items
        return
    yield from tqdm(items, desc=description, total=total, leave=False)
