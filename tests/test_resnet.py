"""The ResNets: torchvision-compatible ResNet-18 and ResNet-101, features, local weights files."""

from __future__ import annotations

import pytest
import torch

from fastinfluence.models import ResNet, load_weights, resnet18, resnet101


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


def torchvision_resnet101_state_shapes() -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of torchvision's ``resnet101()`` (1,000 classes) and its shape,
    written from torchvision's definition: a 7×7 stem, stages of 3, 4, 23, 3 bottlenecks of
    width 64·2^s (1×1 → 3×3 → 1×1 to 4× the width, ``downsample`` on each stage's first
    block), ``fc`` 2048 → 1000; every BatchNorm holds five entries."""
    shapes: dict[str, tuple[int, ...]] = {}

    def batch_norm(name: str, channels: int) -> None:
        for entry in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{entry}"] = (channels,)
        shapes[f"{name}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    batch_norm("bn1", 64)
    previous = 64
    for stage, (count, width) in enumerate(zip((3, 4, 23, 3), (64, 128, 256, 512), strict=True)):
        for block in range(count):
            prefix = f"layer{stage + 1}.{block}"
            shapes[f"{prefix}.conv1.weight"] = (width, previous, 1, 1)
            batch_norm(f"{prefix}.bn1", width)
            shapes[f"{prefix}.conv2.weight"] = (width, width, 3, 3)
            batch_norm(f"{prefix}.bn2", width)
            shapes[f"{prefix}.conv3.weight"] = (4 * width, width, 1, 1)
            batch_norm(f"{prefix}.bn3", 4 * width)
            if block == 0:
                shapes[f"{prefix}.downsample.0.weight"] = (4 * width, previous, 1, 1)
                batch_norm(f"{prefix}.downsample.1", 4 * width)
            previous = 4 * width
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 2048), (1000,)
    return shapes


def test_resnet101_has_torchvision_names_shapes_and_size():
    model = resnet101(1000)
    state = model.state_dict()
    # torchvision's resnet101: 44,549,160 parameters (its ImageNet weights' documented count)
    assert sum(p.numel() for p in model.parameters()) == 44_549_160
    expected = torchvision_resnet101_state_shapes()
    assert len(state) == len(expected) == 626
    assert {name: tuple(tensor.shape) for name, tensor in state.items()} == expected
    # torchvision's "v1.5": the stride sits on the 3×3 convolution, not on the first 1×1
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)
    # the same blocks as ResNet-50: torchvision's resnet50 has 25,557,032 parameters
    resnet50 = ResNet((3, 4, 6, 3), (64, 128, 256, 512), num_classes=1000, block="bottleneck")
    assert sum(p.numel() for p in resnet50.parameters()) == 25_557_032


def test_resnet101_forward_features_and_local_weights(tmp_path):
    torch.manual_seed(0)
    source = resnet101(1000, width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    features = source.features(x)
    assert features.shape == (2, 4 * 8 * 4)
    torch.testing.assert_close(source.fc(features), source(x))
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    target = resnet101(2, width=4, weights=path).eval()
    assert target(x).shape == (2, 2)
    torch.testing.assert_close(target.features(x), features)


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
    with pytest.raises(ValueError, match="block"):
        ResNet(block="wide")
    with pytest.raises(ValueError, match="equal length"):
        ResNet(blocks=(2, 2), widths=(8,))
