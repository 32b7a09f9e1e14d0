"""Models used by the papers, examples and benchmarks."""

from fastinfluence.models.cnn import PaperCNN

__all__ = ["PaperCNN"]
