"""fastinfluence: fast influence functions (Koh & Liang 2017) for PyTorch.

>>> import fastinfluence as fi
>>> scores = fi.score(model, (X_train, y_train), (X_val, y_val))   # > 0 means harmful

Sign and damping conventions: see :mod:`fastinfluence.scoring` and docs/design.md §1.
"""

from fastinfluence._extension import info
from fastinfluence.errors import DivergenceError, NotPositiveDefiniteError, SettingsMismatchError
from fastinfluence.gradient_store import GradientStore, StoreConfig
from fastinfluence.hessian.solvers import (
    CGConfig,
    DirectConfig,
    LiSSAConfig,
    SolveReport,
    WoodburyConfig,
)
from fastinfluence.layers import layer_rules, register_layer
from fastinfluence.scoring import Influence, InfluenceReport, score
from fastinfluence.sharded_output import read_output

__version__ = "0.1.0"

__all__ = [
    "CGConfig",
    "DirectConfig",
    "DivergenceError",
    "GradientStore",
    "Influence",
    "InfluenceReport",
    "LiSSAConfig",
    "NotPositiveDefiniteError",
    "SettingsMismatchError",
    "SolveReport",
    "StoreConfig",
    "WoodburyConfig",
    "info",
    "layer_rules",
    "read_output",
    "register_layer",
    "score",
]
