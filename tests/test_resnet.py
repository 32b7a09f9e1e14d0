"""The compact ResNet: torchvision-compatible ResNet-18, features, local weights files."""

from __future__ import annotations

import pytest
import torch

from fastinfluence.models import ResNet, load_weights, resnet18


def test_resnet18_has_torchvision_names_shapes_and_size():
    model = resnet18(1000)
    state = model.state_dict()
    # torchvision's resnet18: 122 state-dict entries and 11,689,512 parameters
    assert len(state) == 122
    assert sum(p.numel() for p in model.parameters()) == 11_689_512
    expected = {
        "conv1.weight": (64, 3, 7, 7), "layer1.1.conv2.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1), "layer4.1.bn2.running_var": (512,),
        "fc.weight": (1000, 512),
    }
    for name, shape in expected.items():
        assert tuple(state[name].shape) == shape


@pytest.mark.parametrize("stem", ["imagenet", "small"])
def test_forward_and_features(stem):
    torch.manual_seed(0)
    model = resnet18(3, width=8, stem=stem).eval()
    x = torch.rand(2, 3, 32, 32)
    features = model.features(x)
    assert features.shape == (2, 64)
    torch.testing.assert_close(model.fc(features), model(x))


def test_local_weights_load_with_a_new_head(tmp_path):
    torch.manual_seed(0)
    source = resnet18(1000, width=8)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    target = resnet18(2, width=8, weights=path)
    for name, tensor in source.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(target.state_dict()[name], tensor)
    assert target.fc.weight.shape == (2, 64)
    same = resnet18(1000, width=8)
    assert load_weights(same, path) == []
    assert torch.equal(same.fc.weight, source.fc.weight)


def test_bad_weights_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights"):
        resnet18(weights=tmp_path / "missing.pth")
    path = tmp_path / "other.pth"
    torch.save(resnet18(2, width=16).state_dict(), path)
    with pytest.raises(ValueError, match="mis-shaped"):
        resnet18(2, width=8, weights=path)
    with pytest.raises(ValueError, match="stem"):
        ResNet(stem="cifar")
    with pytest.raises(ValueError, match="equal length"):
        ResNet(blocks=(2, 2), widths=(8,))
