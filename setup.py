"""Build of speccascade_fast's optional compiled extension ``speccascade_fast._C``.

Metadata lives in pyproject.toml; this file only decides which extension to build:

* torch with CUDA (``torch.version.cuda`` set) and nvcc found: a CUDAExtension with the CPU
  kernels, the plain-CUDA kernels (csrc/cuda/*.cu) and their torch bindings;
* otherwise, with a C++ compiler: a CppExtension with the CPU kernels;
* no compiler, no torch, or ``SPECCASCADE_NO_EXT=1``: no extension (the package is pure Python
  and falls back to the torch reference paths).

Install with ``pip install --no-build-isolation -e .`` after installing torch: build isolation
would fetch an unpinned torch into the build environment.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern: str) -> list[str]:
    """Sorted paths matching ``pattern`` under the project root, relative to it."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _log(msg: str) -> None:
    print(f"speccascade_fast setup: {msg}", file=sys.stderr)


def _no_ext(why: str) -> None:
    """The one line saying that ``_C`` is not built, why, and what is then slower (said once,
    at the build: pip's metadata steps, egg_info and dist_info, run this file too)."""
    if sys.argv[1:2] in (["egg_info"], ["dist_info"]):
        return
    _log(f"could not build the C++ extension ({why}): installing the pure-Python package, whose "
         "verification and sampling run the pure-torch reference instead of the C++ kernels "
         "(slower)")


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c)


def _extensions():
    if os.environ.get("SPECCASCADE_NO_EXT") == "1":
        _no_ext("SPECCASCADE_NO_EXT=1")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _no_ext("torch is not importable here: install torch==2.13.0 first, then "
                "`pip install --no-build-isolation .`")
        return [], {}
    if not _have_cxx():
        _no_ext("no C++ compiler found")
        return [], {}

    cpu_sources = ["csrc/bindings.cpp", *_rel("csrc/cpu/*.cpp")]
    header_globs = ("*.h", "cpu/*.h", "cuda/*.h", "cuda/*.cuh")
    headers = [h for pattern in header_globs for h in _rel(f"csrc/{pattern}")]
    # -fopenmp: ATen's parallel_for is an inline OpenMP region compiled into our library; the
    # resulting libgomp.so.1 dependency resolves to the copy torch has already loaded.
    # No -march=native: the wheel/editable build must run on any x86-64 (or aarch64) machine.
    # No -std: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.13);
    # our own sources are C++17 and the .cu files (no torch headers) are compiled as C++17.
    cxx = ["-O3", "-g0", "-fopenmp"]  # -g0: no debug info (Python's CFLAGS add -g; slow, big)
    link = ["-fopenmp"]

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if torch.version.cuda is not None and not with_cuda:
        _log("torch has CUDA but nvcc/CUDA_HOME was not found: building the CPU kernels only")
    if with_cuda:
        # sm_80 SASS (+ PTX, JIT-compiled on newer GPUs) and sm_90a for Hopper, unless the user
        # chose the architectures.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
        ext = cpp_extension.CUDAExtension(
            name="speccascade_fast._C",
            sources=cpu_sources + _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu"),
            depends=headers,
            define_macros=[("SC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=link,
        )
        _log(f"building the CUDA extension (torch {torch.__version__}, CUDA {torch.version.cuda})")
    else:
        ext = cpp_extension.CppExtension(
            name="speccascade_fast._C",
            sources=cpu_sources,
            depends=headers,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
        _log(f"building the CPU extension (torch {torch.__version__})")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
