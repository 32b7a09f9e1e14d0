"""The engine's exceptions (the public ones are exported from :mod:`fastinfluence`)."""

from __future__ import annotations


class NotPositiveDefiniteError(ValueError):
    """``H + λI`` has a non-positive eigenvalue, so the inverse-HVP is not defined as asked."""


class DivergenceError(RuntimeError):
    """LiSSA's iterates grew without bound."""


class SettingsMismatchError(ValueError):
    """An output directory holds output of other settings; the message names each
    difference."""


class NotSupportedError(NotImplementedError):
    """A curvature backend was asked for a capability it does not declare
    (:class:`~fastinfluence.hessian.protocol.Capability`); solvers check the declaration first
    and refuse with a message saying what works instead."""
