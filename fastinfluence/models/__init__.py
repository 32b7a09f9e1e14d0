"""Models used by the papers, examples and benchmarks."""

from fastinfluence.models.cnn import PaperCNN
from fastinfluence.models.rescnn import ResBlock1d, ResCNN1d, class_activation_maps
from fastinfluence.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    load_weights,
    resnet18,
    resnet101,
)
from fastinfluence.models.vgg import VGG, vgg16
from fastinfluence.models.vit import ViT, vit_tiny

__all__ = ["VGG", "BasicBlock", "Bottleneck", "PaperCNN", "ResBlock1d", "ResCNN1d", "ResNet",
           "ViT", "class_activation_maps", "load_weights", "resnet18", "resnet101", "vgg16",
           "vit_tiny"]
