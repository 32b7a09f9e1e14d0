"""The MRS paper's 1-D ResCNN (Table 1) and its class activation maps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastinfluence.models import ResCNN1d, class_activation_maps
from fastinfluence.robust.loop import recalibrate_batchnorm


def test_table1_output_sizes():
    model = ResCNN1d().eval()
    x = torch.randn(2, 1, 288)
    h = model.relu(model.bn(model.conv(x)))
    assert h.shape == (2, 16, 288)
    expected = [(16, 144), (16, 144), (32, 72), (32, 72), (64, 36), (64, 36), (128, 18),
                (128, 18)]
    for block, shape in zip(model.blocks, expected, strict=True):
        h = block(h)
        assert h.shape == (2, *shape)
        assert block.conv1[1].kernel_size == (32,) and block.conv2[1].kernel_size == (32,)
        assert block.dropout.p == 0.55
    assert model.features(x).shape == (2, 128) and model(x).shape == (2, 2)
    # 17 convolutions of width 32 (the input one and two per block), as the paper counts
    widths = [m.kernel_size[0] for m in model.modules() if isinstance(m, torch.nn.Conv1d)]
    assert widths.count(32) == 17
    with pytest.raises(ValueError, match="dropout"):
        ResCNN1d(dropout=1.0)


@pytest.mark.parametrize("length", [288, 45])
def test_pool_shortcut_is_max_pooling_with_zero_channels(length):
    """The paper's shortcut: no parameters, the strided blocks' shortcut is the max over each
    window of the stride (the last window partial for an odd length) and the new channels are
    zero; the output sizes stay Table 1's."""
    model = ResCNN1d(shortcut="pool").eval()
    projection = ResCNN1d().eval()
    shortcut_parameters = [n for n, _ in model.named_parameters() if "shortcut" in n]
    assert shortcut_parameters == [] and any(
        "shortcut" in n for n, _ in projection.named_parameters())
    x = torch.randn(3, 16, length)
    for index, (in_channels, channels) in ((0, (16, 16)), (2, (16, 32)), (1, (16, 16))):
        block = model.blocks[index]
        out = block.shortcut(x[:, :in_channels])
        stride = 2 if index % 2 == 0 else 1
        padded = F.pad(x[:, :in_channels], (0, -length % stride), value=-torch.inf)
        pooled = padded.unfold(2, stride, stride).amax(-1)
        assert out.shape == (3, channels, -(-length // stride))
        torch.testing.assert_close(out[:, :in_channels], pooled, rtol=0, atol=0)
        assert (out[:, in_channels:] == 0).all()
    assert model(torch.randn(2, 1, length)).shape == (2, 2)
    with pytest.raises(ValueError, match="shortcut"):
        ResCNN1d(shortcut="conv")


def planted(n: int, position: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise spectra; class 1 carries a narrow peak at ``position``."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 288, generator=generator)
    peak = torch.exp(-0.5 * ((torch.arange(288) - position) / 3.0) ** 2)
    return x + 4 * y[:, None, None] * peak, y


@pytest.mark.parametrize("position", [60, 200])
def test_cam_of_a_planted_feature_peaks_there(position):
    x, y = planted(128, position, seed=position)
    torch.manual_seed(0)
    model = ResCNN1d(width=4, dropout=0.0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(4):
        for index in torch.randperm(128).split(32):
            optimiser.zero_grad()
            F.cross_entropy(model(x[index]), y[index]).backward()
            optimiser.step()
    recalibrate_batchnorm(model, x, 128, torch.device("cpu"))  # 16 steps leave them stale
    test_x, test_y = planted(32, position, seed=position + 1)
    assert (model.eval()(test_x).argmax(1) == test_y).float().mean() > 0.9
    cams = class_activation_maps(model, test_x[test_y == 1], 1)
    assert cams.shape == (16, 288) and model.training is False
    # within two of the last block's 18 cells (16 points each) of the peak
    assert abs(int(cams.mean(0).argmax()) - position) <= 32
    # the predicted class by default
    predicted = model(test_x[:4]).argmax(1)
    torch.testing.assert_close(class_activation_maps(model, test_x[:4]),
                               class_activation_maps(model, test_x[:4], predicted))
