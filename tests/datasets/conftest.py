"""Shared fixture: a small generated brain-tumour data set."""

from __future__ import annotations

import pytest

from fastinfluence.datasets import make_brain_tumour


@pytest.fixture(scope="session")
def small_brain():
    return make_brain_tumour(n_slices=36, n_patients=9, image_size=32, seed=0)
