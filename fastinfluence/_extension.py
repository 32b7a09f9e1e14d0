"""Loads the native extension ``fastinfluence._C`` behind a guard and reports on it.

Without the extension (not built, or built for another torch) every op in
``fastinfluence.ops`` runs its pure-PyTorch twin; the first time that happens a warning says
why, once per reason.
"""

import warnings

import torch

OPS = (
    "head_hvp",
    "head_scores",
    "lissa_update_",
    "head_lissa",
    "linear_per_sample_grad",
    "linear_per_sample_grad_dot",
    "conv2d_per_sample_grad",
    "conv2d_per_sample_grad_dot",
)

try:
    import fastinfluence._C  # noqa: F401  (importing registers torch.ops.fastinfluence)

    LOAD_ERROR: str | None = None
except ImportError as error:
    LOAD_ERROR = f"{type(error).__name__}: {error}"

_warned: set[str] = set()


def loaded() -> bool:
    """Whether ``fastinfluence._C`` is imported and its ops are registered."""
    return LOAD_ERROR is None


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the native op ``fastinfluence::<op>`` has a kernel for ``device_type``."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return (
        loaded()
        and key is not None
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastinfluence::{op}", key)
    )


def warn_twin_fallback(op: str, device_type: str) -> None:
    """Warn, once per reason, that ``op`` runs its pure-PyTorch twin for lack of a native kernel."""
    reason = (
        f"fastinfluence._C is not loaded ({LOAD_ERROR})"
        if not loaded()
        else f"fastinfluence._C was built without {device_type.upper()} kernels"
    )
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(
        f"{reason}; fastinfluence.ops.{op} and the other ops run their slower pure-PyTorch "
        "twins. Rebuild with `pip install --no-build-isolation -e .` to get the native kernels.",
        RuntimeWarning,
        stacklevel=3,
    )


def info() -> dict:
    """What the native layer offers here: extension state, devices, versions, registered ops."""
    devices = [key for key in ("cpu", "cuda") if any(has_kernel(op, key) for op in OPS)]
    return {
        "extension_loaded": loaded(),
        "extension_error": LOAD_ERROR,
        "native_devices": devices,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "ops": {op: [key for key in ("cpu", "cuda") if has_kernel(op, key)] for op in OPS},
    }


def format_info(report: dict) -> str:
    """``info()`` as the text ``python -m fastinfluence info`` prints."""
    state = "loaded" if report["extension_loaded"] else f"NOT loaded ({report['extension_error']})"
    lines = [
        f"fastinfluence._C: {state}",
        f"native kernels for: {', '.join(report['native_devices']) or 'none (twins run)'}",
        f"torch {report['torch']}, built with CUDA {report['torch_cuda']}, "
        f"CUDA available: {report['cuda_available']}",
        "ops (torch.ops.fastinfluence):",
    ]
    for op, devices in report["ops"].items():
        lines.append(f"  {op:<28} {', '.join(devices) or 'twin only'}")
    return "\n".join(lines)
