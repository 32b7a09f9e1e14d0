"""Model factories that ``python -m fastinfluence score --model cli_models:...`` imports in the
tests (this folder is on ``sys.path``)."""

from torch import nn


def tiny_mlp(features: int = 5, classes: int = 3, hidden: int = 8) -> nn.Module:
    """A float64 MLP on ``[n, features]`` inputs."""
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(),
                         nn.Linear(hidden, classes)).double()


def tiny_image_model(side: int = 4, classes: int = 2) -> nn.Module:
    """A float64 linear classifier on ``[n, 1, side, side]`` images."""
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, classes)).double()
