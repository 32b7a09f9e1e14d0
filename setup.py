"""Packaging build: the Python package plus the native extension ``fastinfluence._C``.

The native sources live in ``csrc/``; see docs/design.md §4 and docs/guide/native.md.

``FASTINFLUENCE_CUDA`` picks the kernels that are compiled:
  ``auto`` (default): CPU, plus CUDA when torch was built with CUDA and nvcc is found;
  ``1``: CPU and CUDA, failing if that is impossible; ``0``: CPU only.
CUDA builds honour ``TORCH_CUDA_ARCH_LIST`` and default to ``8.0;9.0`` (sm_80, sm_90).

The extension links against the torch it is compiled with, and torch's C++ ABI changes between
releases: the runtime requirement is therefore ``torch==<that version>`` (computed here, hence
``dynamic = ["dependencies"]`` in pyproject.toml), and the build writes that version into
``fastinfluence/_build_info.py`` so that ``fastinfluence._extension`` can name a mismatch.
"""

import glob
import os
import sys

import torch
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"
BUILD_INFO = os.path.join("fastinfluence", "_build_info.py")
# Runtime dependencies besides torch, whose pin is computed in runtime_requirements().
BASE_REQUIREMENTS = ["numpy>=1.24", "tqdm>=4.60", "scipy>=1.10"]


def runtime_requirements(torch_version: str) -> list[str]:
    """``torch==`` the release being built against, plus the other runtime dependencies.

    The local label (``+cpu``, ``+cu130``) is dropped: PEP 440 cannot pin it in a requirement
    that pip resolves from PyPI, and the release number is what fixes torch's C++ ABI.
    """
    return [f"torch=={torch_version.split('+', 1)[0]}", *BASE_REQUIREMENTS]


def cuda_wanted() -> bool:
    """Resolve FASTINFLUENCE_CUDA=auto|0|1 against the installed torch and toolkit."""
    from torch.utils.cpp_extension import CUDA_HOME

    choice = os.environ.get("FASTINFLUENCE_CUDA", "auto").strip().lower()
    if choice not in ("auto", "0", "1"):
        raise SystemExit(f"FASTINFLUENCE_CUDA must be auto, 0 or 1, got {choice!r}")
    if choice == "0":
        return False
    if choice == "1":
        if torch.version.cuda is None:
            raise SystemExit(
                f"FASTINFLUENCE_CUDA=1, but torch {torch.__version__} was built without CUDA"
            )
        if CUDA_HOME is None:
            raise SystemExit("FASTINFLUENCE_CUDA=1, but no CUDA toolkit (nvcc) was found")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def native_extensions():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "cpu", "*.cpp")))
    with_cuda = cuda_wanted()
    cxx_flags = ["-O3"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for runs on OpenMP only in code compiled with it.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    options = {
        "include_dirs": [os.path.join(ROOT, "csrc")],
        "extra_link_args": link_flags,
    }
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "ops", "cuda", "*.cu")))
        ext = CUDAExtension(
            "fastinfluence._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            **options,
        )
        device = f"CPU + CUDA {torch.version.cuda}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}"
    else:
        ext = CppExtension("fastinfluence._C", sources, extra_compile_args=cxx_flags, **options)
        device = "CPU only"
    print(
        f"fastinfluence: building fastinfluence._C ({device}) from {len(sources)} sources "
        f"against torch {torch.__version__} "
        f"(FASTINFLUENCE_CUDA={os.environ.get('FASTINFLUENCE_CUDA', 'auto')})"
    )
    return [ext], {"build_ext": build_ext_recording_torch(BuildExtension)}


def build_ext_recording_torch(base: type) -> type:
    """torch's ``BuildExtension`` that also writes ``fastinfluence/_build_info.py`` next to the
    built extension (in the build folder, and in the source tree for in-place and editable
    builds)."""

    class BuildNative(base.with_options(no_python_abi_suffix=True)):
        def run(self) -> None:
            super().run()
            text = (
                '"""Written by setup.py when it builds fastinfluence._C: the torch it was '
                'compiled against."""\n\n'
                f'TORCH_VERSION = "{torch.__version__}"\n'
            )
            targets = [os.path.join(self.build_lib, BUILD_INFO)]
            if self.inplace:
                targets.append(os.path.join(ROOT, BUILD_INFO))
            for target in targets:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "w", encoding="utf-8") as handle:
                    handle.write(text)

    return BuildNative


ext_modules, cmdclass = native_extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=runtime_requirements(torch.__version__),
)
