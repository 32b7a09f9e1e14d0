"""The mode the engine runs a model in: eval mode, with the caller's flags restored after.

A module of its own below :mod:`fastinfluence.params` and :mod:`fastinfluence.functional`,
which both run the model in it (so neither imports the other for it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own ``training`` flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag
