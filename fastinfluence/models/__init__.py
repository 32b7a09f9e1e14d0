"""Models used by the papers, examples and benchmarks."""

from fastinfluence.models.cnn import PaperCNN
from fastinfluence.models.resnet import BasicBlock, ResNet, load_weights, resnet18
from fastinfluence.models.vgg import VGG, vgg16

__all__ = ["VGG", "BasicBlock", "PaperCNN", "ResNet", "load_weights", "resnet18", "vgg16"]
