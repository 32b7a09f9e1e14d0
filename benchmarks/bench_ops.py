"""Native ops against their pure-PyTorch twins.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--dtype float32|float64] [--repeats N]

Prints a Markdown table: best-of-N time of each op and its twin, the speed-up, and for the
memory-bound head ops the bandwidth achieved on A (bytes of A / time) next to a plain copy
of the same bytes (``A.clone()``). Head problem: n=4096, d=1024, 3 classes; head_hvp,
head_scores and head_lissa take k ∈ {1, 8} directions per call, and for k = 8 the table also
times k one-direction native calls (what a caller looping over directions pays).
"""

import argparse
import time

import torch

from fastinfluence import _extension
from fastinfluence.ops import twins

NATIVE = torch.ops.fastinfluence


def best_time(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of fn() in seconds over `repeats` runs, after two warm-up runs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def head_cases(A, P, y, Vw, Vb):
    """head_hvp, head_scores and minibatch head_lissa rows for the k = len(Vw) directions
    (Vw, Vb)."""
    k, a_bytes = len(Vw), A.numel() * A.element_size()

    def one_at_a_time(op):
        if k == 1:
            return None
        return lambda: [op(Vw[j : j + 1], Vb[j : j + 1]) for j in range(k)]

    def hvp(W, b):
        return NATIVE.head_hvp(A, P, W, b, 0.01)

    def scores(W, b):
        return NATIVE.head_scores(A, P, y, W, b)

    def lissa(W, b):
        return NATIVE.head_lissa(A, P, W, b, 0.01, 10.0, 20, 512, 0)

    return [
        (
            f"head_hvp (4096x1024, C=3, k={k})",
            lambda: hvp(Vw, Vb),
            lambda: twins.head_hvp(A, P, Vw, Vb, 0.01),
            one_at_a_time(hvp),
            a_bytes,
        ),
        (
            f"head_scores (4096x1024, C=3, k={k})",
            lambda: scores(Vw, Vb),
            lambda: twins.head_scores(A, P, y, Vw, Vb),
            one_at_a_time(scores),
            a_bytes,
        ),
        (
            f"head_lissa (depth 20, batch 512, k={k})",
            lambda: lissa(Vw, Vb),
            lambda: twins.head_lissa(A, P, Vw, Vb, 0.01, 10.0, 20, 512, 0),
            one_at_a_time(lissa),
            None,
        ),
    ]


def cases(device: torch.device, dtype: torch.dtype):
    """(name, native call, twin call, k one-direction native calls or None, bytes of A or
    None), and A."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(device)

    n, d, C = 4096, 1024, 3
    A = randn(n, d)
    P = torch.softmax(randn(n, C), dim=1)
    y = torch.randint(0, C, (n,), generator=gen).to(device)
    head = [row for k in (1, 8) for row in head_cases(A, P, y, randn(k, C, d), randn(k, C))]
    Gw, Gb = randn(1, C, d), randn(1, C)
    v, g, hv = randn(1 << 22), randn(1 << 22), randn(1 << 22)
    x, go, v_lin = randn(256, 16, 128), randn(256, 16, 64), randn(64, 128)
    xu, gc, v_conv = randn(64, 288, 256), randn(64, 64, 256), randn(64, 288)
    return head + [
        (
            "head_lissa (depth 5, full batch, k=1)",
            lambda: NATIVE.head_lissa(A, P, Gw, Gb, 0.01, 10.0, 5, None, 0),
            lambda: twins.head_lissa(A, P, Gw, Gb, 0.01, 10.0, 5, None, 0),
            None,
            None,
        ),
        (
            "lissa_update_ (4M entries)",
            lambda: NATIVE.lissa_update_(v, g, hv, 0.01, 10.0),
            lambda: twins.lissa_update_(v, g, hv, 0.01, 10.0),
            None,
            None,
        ),
        (
            "linear_per_sample_grad (256x16, 128->64)",
            lambda: NATIVE.linear_per_sample_grad(x, go),
            lambda: twins.linear_per_sample_grad(x, go),
            None,
            None,
        ),
        (
            "linear_per_sample_grad_dot",
            lambda: NATIVE.linear_per_sample_grad_dot(x, go, v_lin),
            lambda: twins.linear_per_sample_grad_dot(x, go, v_lin),
            None,
            None,
        ),
        (
            "conv2d_per_sample_grad (64, K=288, L=256, 64)",
            lambda: NATIVE.conv2d_per_sample_grad(xu, gc),
            lambda: twins.conv2d_per_sample_grad(xu, gc),
            None,
            None,
        ),
        (
            "conv2d_per_sample_grad_dot",
            lambda: NATIVE.conv2d_per_sample_grad_dot(xu, gc, v_conv),
            lambda: twins.conv2d_per_sample_grad_dot(xu, gc, v_conv),
            None,
            None,
        ),
    ], A


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if not _extension.has_kernel("head_hvp", device.type):
        raise SystemExit(f"no native {device.type} kernels: {_extension.info()}")
    rows, A = cases(device, dtype)
    copy_s = best_time(A.clone, device, args.repeats)
    a_gb = A.numel() * A.element_size() / 1e9
    print(
        f"device {device.type}, {args.dtype}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; A.clone(): {copy_s * 1e3:.3f} ms "
        f"({2 * a_gb / copy_s:.1f} GB/s read+write, {a_gb / copy_s:.1f} GB/s of A)\n"
    )
    print(
        "| op | native ms | twin ms | speed-up | k one-direction native calls ms "
        "| batching gain | native GB/s of A | clone GB/s of A |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, native, twin, singles, a_bytes in rows:
        native_s = best_time(native, device, args.repeats)
        twin_s = best_time(twin, device, args.repeats)
        if singles is None:
            looped = "– | –"
        else:
            singles_s = best_time(singles, device, args.repeats)
            looped = f"{singles_s * 1e3:.3f} | {singles_s / native_s:.2f}x"
        bandwidth = f"{a_bytes / 1e9 / native_s:.1f} | {a_gb / copy_s:.1f}" if a_bytes else "– | –"
        print(
            f"| {name} | {native_s * 1e3:.3f} | {twin_s * 1e3:.3f} | "
            f"{twin_s / native_s:.2f}x | {looped} | {bandwidth} |"
        )


if __name__ == "__main__":
    main()
