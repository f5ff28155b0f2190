"""Builds csrc/cuda's kernels and torch bindings for CPU tensors, on csrc/emu's emulator of the
CUDA execution model (csrc/emu/README.md), so that CI runs them without a GPU.

The kernels (csrc/cuda/*.cu) are compiled as C++ against the emulator's stand-ins for CUDA's
headers (csrc/emu/include), after two textual rewrites of what is CUDA syntax and not C++:
``kernel<<<grid, block, shared, stream>>>(args)`` becomes
``sc_emu::launch(kernel, grid, block, shared, stream)(args)``, and ``extern __shared__ T s[];``
a pointer to the emulated dynamic shared memory, and ``__shared__ T s...;`` a static variable
that the first thread of each block fills with garbage. Nothing else of the source changes. The
bindings (csrc/cuda/*_cuda.cpp) are compiled as they are, with ``SC_CUDA_EMU`` (csrc/cuda/device.h:
CPU tensors, no stream), into one pybind11 module (csrc/emu/bindings.cpp) with the ops'
argument orders. Built once per source state under build/cuda_emu (torch's extension loader
caches it there).
"""
from __future__ import annotations

import functools
import pathlib
import re
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
KERNELS = (CSRC / "cuda" / "verify.cu", CSRC / "cuda" / "sample.cu", CSRC / "emu" / "selftest.cu")
BUILD = ROOT / "build" / "cuda_emu"

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[\w:, ]+>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]\s*;")
_SHARED = re.compile(r"__shared__\s+([\w:]+)\s+(\w+)((?:\s*\[[^\]]+\])*)\s*;")


def translate(source: str, path: pathlib.Path) -> str:
    """A .cu file's text as C++ for the emulator (see the module docstring)."""
    out, launches = _LAUNCH.subn(r"::sc_emu::launch(\1, \2)(", source)
    out = _EXTERN_SHARED.sub(r"\1* const \2 = static_cast<\1*>(::sc_emu::dynamic_shared());", out)
    out = _SHARED.sub(r"static \1 \2\3; ::sc_emu::poison_once(&\2, sizeof(\2));", out)
    code = re.sub(r"//[^\n]*", "", out)
    if "<<<" in code or "__shared__" in code:
        raise RuntimeError(f"{path}: a launch or shared variable the rewrite did not match")
    if launches == 0:
        raise RuntimeError(f"{path}: no kernel launch found")
    return f'#line 1 "{path}"\n{out}'


def _write_if_changed(path: pathlib.Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


@functools.cache
def module():
    """The compiled emulator module: ``verify_padded``, ``verify_ragged`` (the signatures of
    ``torch.ops.speccascade``'s ops), ``sample_cuda`` (``speccascade_fast._C``'s) and
    ``selftest`` (csrc/emu/selftest.cu)."""
    from torch.utils import cpp_extension

    gen = BUILD / "src"
    gen.mkdir(parents=True, exist_ok=True)
    sources = []
    for cu in KERNELS:
        path = gen / (cu.stem + "_emu.cpp")
        _write_if_changed(path, translate(cu.read_text(), cu))
        sources.append(str(path))
    sources.append(str(CSRC / "emu" / "bindings.cpp"))
    return cpp_extension.load(
        name="speccascade_cuda_emu",
        sources=sources,
        extra_include_paths=[str(CSRC / "emu" / "include"), str(CSRC / "cuda"), str(CSRC)],
        extra_cflags=["-O2", "-g0", "-DSC_CUDA_EMU", "-Wno-unknown-pragmas"],
        build_directory=str(BUILD),
        with_cuda=False,
        verbose=False,
    )


class _Padded:
    """``verify_padded`` with its ``.budget`` overload, as ``torch.ops.speccascade`` has them."""

    def __init__(self, m):
        self._m = m

    def __call__(self, *args, **kw):
        return self._m.verify_padded(*args, **kw)

    def budget(self, *args, **kw):
        return self._m.verify_padded_budget(*args, **kw)


def ops():
    """An object with the ``verify_padded`` (and its ``.budget`` overload) / ``verify_ragged`` of
    ``torch.ops.speccascade`` (what :func:`speccascade_fast.backends._ops.call_padded` /
    ``call_ragged`` call), run by the CUDA kernels on the emulator."""
    m = module()
    return types.SimpleNamespace(verify_padded=_Padded(m), verify_ragged=m.verify_ragged)
