"""Shared inputs for the native-op tests: random problems in the requested dtype/device."""

import pytest
import torch

import fastinfluence as fi

INFO = fi.info()

requires_native = pytest.mark.skipif(
    not INFO["extension_loaded"], reason=f"fastinfluence._C not loaded: {INFO['extension_error']}"
)
requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and "cuda" in INFO["ops"]["head_hvp"]),
    reason="needs a CUDA device and an extension built with CUDA kernels",
)

# (atol, rtol) by dtype for native vs twin.
TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4)}


def head_problem(n, d, C, dtype=torch.float64, device="cpu", seed=0, bias=True, k=1):
    """(A, P, y, Vw, Vb): features, probabilities, labels, and k directions shaped like the
    head's (W, b): Vw [k, C, d], Vb [k, C]."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, generator=gen, dtype=torch.float64)
    P = torch.softmax(torch.randn(n, C, generator=gen, dtype=torch.float64) * 2, dim=1)
    y = torch.randint(0, C, (n,), generator=gen)
    Vw = torch.randn(k, C, d, generator=gen, dtype=torch.float64)
    Vb = torch.randn(k, C, generator=gen, dtype=torch.float64) if bias else None
    floats = [t if t is None else t.to(device=device, dtype=dtype) for t in (A, P, Vw, Vb)]
    return floats[0], floats[1], y.to(device), floats[2], floats[3]


def noncontiguous(t):
    """The same values in a transposed-storage (non-contiguous) tensor, for 2-D and up."""
    if t is None or t.dim() < 2:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)
