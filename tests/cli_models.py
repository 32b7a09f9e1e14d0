"""Model factories, losses and output selectors that ``python -m fastinfluence score --model
cli_models:...`` (``--loss``, ``--output``) imports in the tests (this folder is on
``sys.path``)."""

import torch
from torch import nn


def tiny_mlp(features: int = 5, classes: int = 3, hidden: int = 8) -> nn.Module:
    """A float64 MLP on ``[n, features]`` inputs."""
    return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(),
                         nn.Linear(hidden, classes)).double()


def tiny_image_model(side: int = 4, classes: int = 2) -> nn.Module:
    """A float64 linear classifier on ``[n, 1, side, side]`` images."""
    return nn.Sequential(nn.Flatten(), nn.Linear(side * side, classes)).double()


def squared_error(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A per-sample loss other than the default: squared distance to the one-hot label."""
    return ((output - nn.functional.one_hot(y, output.shape[-1])) ** 2).sum(dim=-1)


def mean_squared_error(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same loss reduced to one number: not a per-sample loss."""
    return squared_error(output, y).mean()


def halved(output: torch.Tensor) -> torch.Tensor:
    """An output selector: the model's output at temperature 2."""
    return output / 2
