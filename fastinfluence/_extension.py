"""Loads the native extension ``fastinfluence._C`` behind a guard and reports on it.

Without the extension (not built, or built for another torch) every op in
``fastinfluence.ops`` runs its pure-PyTorch twin; the first time that happens a warning says
why, once per reason. ``setup.py`` records the torch it compiled against in
``fastinfluence._build_info``; an extension built for another torch version is not imported
(its C++ ABI would not match), and the reason names both versions.

``FASTINFLUENCE_REQUIRE_NATIVE=1`` (CI sets it) turns a missing or unloadable extension into
an ImportError at import, so that nothing silently runs the twins.
"""

import importlib
import os
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


def _build_torch_version() -> str | None:
    """The torch version ``fastinfluence._C`` was compiled against (None: not recorded)."""
    try:
        return importlib.import_module("fastinfluence._build_info").TORCH_VERSION
    except ImportError:
        return None


def _public(version: str) -> str:
    """``2.13.0+cpu`` -> ``2.13.0``: the release, without the local build label."""
    return version.split("+", 1)[0]


def _load_native(built_against: str | None) -> str | None:
    """Import ``fastinfluence._C`` (registering torch.ops.fastinfluence); the reason if not."""
    if built_against is not None and _public(built_against) != _public(torch.__version__):
        return f"built against torch {built_against}, running torch {torch.__version__}"
    try:
        importlib.import_module("fastinfluence._C")
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return None


def _native_required() -> bool:
    value = os.environ.get("FASTINFLUENCE_REQUIRE_NATIVE", "0").strip()
    if value not in ("0", "1", ""):
        raise ValueError(f"FASTINFLUENCE_REQUIRE_NATIVE must be 0 or 1, got {value!r}")
    return value == "1"


BUILT_AGAINST_TORCH: str | None = _build_torch_version()
LOAD_ERROR: str | None = _load_native(BUILT_AGAINST_TORCH)
if LOAD_ERROR is not None and _native_required():
    raise ImportError(
        f"FASTINFLUENCE_REQUIRE_NATIVE=1, but fastinfluence._C is not loaded ({LOAD_ERROR}). "
        "Rebuild it with `pip install --no-build-isolation -e .`"
    )

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
        "extension_built_against_torch": BUILT_AGAINST_TORCH,
        "native_devices": devices,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "ops": {op: [key for key in ("cpu", "cuda") if has_kernel(op, key)] for op in OPS},
    }


def format_info(report: dict) -> str:
    """``info()`` as the text ``python -m fastinfluence info`` prints."""
    state = "loaded" if report["extension_loaded"] else f"NOT loaded ({report['extension_error']})"
    built = report["extension_built_against_torch"]
    built = f"torch {built}" if built else "an unrecorded torch version"
    lines = [
        f"fastinfluence._C: {state}; built against {built}",
        f"native kernels for: {', '.join(report['native_devices']) or 'none (twins run)'}",
        f"torch {report['torch']}, built with CUDA {report['torch_cuda']}, "
        f"CUDA available: {report['cuda_available']}",
        "ops (torch.ops.fastinfluence):",
    ]
    for op, devices in report["ops"].items():
        lines.append(f"  {op:<28} {', '.join(devices) or 'twin only'}")
    return "\n".join(lines)
