"""The compact ViT (:mod:`fastinfluence.models.vit`): it trains, and ``Influence`` scores it
against the float64 oracle, the whole network by the fused tangent pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastinfluence as fi
from fastinfluence import reference
from fastinfluence.models import ViT, vit_tiny


def tiny(seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    return vit_tiny(3, image_size=8, patch=4, dim=8, depth=1, heads=2).double()


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=generator))


def test_shapes_defaults_and_one_training_step():
    model = vit_tiny(4)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    assert vit_tiny(2, image_size=64)(torch.rand(2, 1, 64, 64)).shape == (2, 2)
    model = tiny()
    x, y = data(8, 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    with torch.no_grad():
        assert F.cross_entropy(model(x), y) < loss


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="patch"):
        vit_tiny(2, image_size=30)
    with pytest.raises(ValueError, match="heads"):
        vit_tiny(2, dim=30, heads=4)


@pytest.mark.parametrize("params", ["last", "all"])
def test_influence_matches_the_float64_oracle(params):
    """Scores ``−∇l(z_i)ᵀ(G + λI)⁻¹∇L(val)`` with the explicit Gauss-Newton matrix."""
    model = tiny().eval()
    train, val = data(12, 2), data(4, 3)
    influence = fi.Influence(model, train, val, params=params, hessian="gauss-newton",
                             solver="direct")
    plist = (list(model.head.parameters()) if params == "last"
             else list(model.parameters()))
    if params == "all":
        assert influence.report.scoring == "fused-tangent", influence.report.scoring_reason
    matrix = reference.gauss_newton(model, plist, *train)
    solution = reference.ihvp_direct(matrix, reference.mean_loss_grad(model, plist, *val),
                                     influence.damping)
    torch.testing.assert_close(influence.ihvp, solution, rtol=1e-8, atol=1e-10)
    expected = -(reference.per_sample_grads(model, plist, *train) @ solution)
    torch.testing.assert_close(influence.scores(), expected, rtol=1e-8, atol=1e-10)
