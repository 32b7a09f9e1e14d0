"""Models used by the papers, examples and benchmarks."""

from fastinfluence.models.cnn import PaperCNN
from fastinfluence.models.resnet import BasicBlock, ResNet, load_weights, resnet18

__all__ = ["BasicBlock", "PaperCNN", "ResNet", "load_weights", "resnet18"]
