"""The sample-grid plot."""

from __future__ import annotations

import matplotlib.image
import pytest

from fastinfluence.datasets import save_brain_tumour_grid


def test_saves_a_png_grid(small_brain, tmp_path):
    path = save_brain_tumour_grid(small_brain, tmp_path / "sub" / "grid.png", per_class=2, dpi=40)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    one_row = save_brain_tumour_grid(small_brain, tmp_path / "one.png", per_class=1, dpi=40)
    # six rows (two per class) are about twice as tall as three, and three columns wide
    assert pixels.shape[0] == pytest.approx(2 * matplotlib.image.imread(one_row).shape[0], rel=0.05)
    assert pixels.shape[1] < pixels.shape[0]


def test_bad_per_class(small_brain, tmp_path):
    with pytest.raises(ValueError, match="per_class"):
        save_brain_tumour_grid(small_brain, tmp_path / "x.png", per_class=0)
