"""torchvision's ``VisionTransformer`` (a small configuration built locally, random
initialisation, no weights) scored by ``Influence`` against the float64 oracle with
Gauss-Newton, direct and CG: ``params="last"``, the head by name, and every parameter.

``"last"`` is the module holding the parameter the forward uses last: the head, although the
``VisionTransformer`` itself owns ``class_token`` and its forward, wrapping every other
module's, finishes last.

torchvision is an optional test dependency: this module skips without it (and where it does
not import beside the installed torch)."""

from __future__ import annotations

import pytest
import torch
from test_transformers import oracle_scores

import fastinfluence as fi

models = pytest.importorskip("torchvision.models")

DAMPING = 1.0


def tiny_vit() -> torch.nn.Module:
    """8² RGB images in 4 patches of 4², width 8, one block of 2 heads, 3 classes, float64."""
    torch.manual_seed(0)
    return models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2,
                                    hidden_dim=8, mlp_dim=16, num_classes=3).double().eval()


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 8, 8, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=generator))


HEAD = ["heads.head.weight", "heads.head.bias"]
SELECTED = {"last": HEAD, "head": HEAD}
"""The parameters each selection takes, by name (``"all"``: every one)."""


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("selection", ["last", "head", "all"])
def test_torchvision_vision_transformer_scores_as_the_oracle(selection, solver):
    model = tiny_vit()
    train, val = data(10, 1), data(4, 2)
    options = {"tol": 1e-12} if solver == "cg" else {}
    params = ["heads.head"] if selection == "head" else selection
    inf = fi.Influence(model, train, val, params=params, hessian="gauss-newton",
                       solver=solver, damping=DAMPING, **options)
    named = dict(model.named_parameters())
    plist = [named[name] for name in SELECTED.get(selection, named)]
    if selection in ("head", "last"):
        assert inf.report.path == "head-closed-form", inf.report.path_reason
    expected, solution = oracle_scores(model, train, val, "gauss-newton", plist=plist)
    torch.testing.assert_close(inf.ihvp, solution, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(inf.scores(), expected, rtol=1e-9, atol=1e-11)
