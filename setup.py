"""Packaging build: the Python package plus the native extension ``fastinfluence._C``.

The native sources live in ``csrc/``; see DESIGN.md §4 and the README's "Native kernels" section.
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def native_extensions():
    from torch.utils.cpp_extension import CppExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "ops", "cpu", "*.cpp")))
    if not sources:
        print("fastinfluence: no native sources found; building the pure-Python package only")
        return [], {}
    print(f"fastinfluence: building fastinfluence._C (CPU) from {len(sources)} sources")
    ext = CppExtension(
        "fastinfluence._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=["-O3", "-std=c++17"],
    )
    from torch.utils.cpp_extension import BuildExtension

    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = native_extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
