"""The matmul and de-quantisation kernels of :mod:`speccascade_fast.quant`.

``ours``: ``qmatmul.cpp`` beside this file, compiled on first use with the machine's own
instruction set (``c++ -O3 -march=native -fopenmp``) into ``<cache_dir()>/kernels/`` and called
through ctypes; AVX-512 where the CPU has it, else AVX2 with FMA (the same arithmetic in 8-lane
halves), else a portable loop (:func:`vector_path` says which). Every path gives the same
outputs bit for bit. It reads the GGUF block
structure as it is (codes, per-group integer scales, per-super-block fp32 factors), so its
weights are those of the fp32 reference de-quantisation bit for bit, and computes every output
in an order that does not depend on how many rows are multiplied together.

``torch``: PyTorch's own CPU kernels, ``aten._weight_int4pack_mm_for_cpu`` (4-bit codes, group
32, scale and zero point rounded to the activations' dtype) and ``aten._weight_int8pack_mm``
(int8 with one scale per output channel); used when ours cannot be built (no compiler, not a
CPU tensor) and measured against ours by ``bench/bench_quant.py``.

``SPECCASCADE_QUANT_KERNEL=torch`` (or ``ours``) forces one; the default ``auto`` takes ours when
it builds. A :class:`~.modules.QuantLinear` reads it when it first multiplies a few rows with
activations of a dtype (and again after ``.to()`` or a change of its tensors), not on every
call.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import torch

SOURCE = pathlib.Path(__file__).with_name("qmatmul.cpp")
KERNELS = ("auto", "ours", "torch")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

#: Why our kernels are unavailable (one line), or None when they loaded (or were not tried yet).
BUILD_ERROR: str | None = None


def kernel_choice() -> str:
    """``SPECCASCADE_QUANT_KERNEL`` (``auto``, ``ours`` or ``torch``; default ``auto``)."""
    v = os.environ.get("SPECCASCADE_QUANT_KERNEL", "auto").strip().lower() or "auto"
    if v not in KERNELS:
        raise ValueError(f"SPECCASCADE_QUANT_KERNEL={v!r}: choose one of {', '.join(KERNELS)}")
    return v


def _cpu_key() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return sys.platform


def _compiler() -> str | None:
    for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return c
    return None


def _build_dir() -> pathlib.Path:
    """``<cache>/kernels``, the cache folder resolved as models.cache_dir does (not imported:
    models imports this package)."""
    env = os.environ.get("SPECCASCADE_CACHE")
    if env:
        return pathlib.Path(env).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "speccascade_fast" / "kernels"


@functools.cache
def _library() -> ctypes.CDLL | None:
    global BUILD_ERROR
    cxx = _compiler()
    if cxx is None:
        BUILD_ERROR = "no C++ compiler found (set CXX)"
        return None
    try:
        src = SOURCE.read_bytes()
    except OSError as e:
        BUILD_ERROR = f"{SOURCE} cannot be read ({e})"
        return None
    key = hashlib.sha256(src + " ".join([cxx, *_FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    lib = _build_dir() / f"qmatmul-{key}.so"
    if not lib.is_file():
        try:
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        except OSError as e:
            BUILD_ERROR = f"cannot write to {lib.parent} ({e})"
            return None
        os.close(fd)
        try:
            r = subprocess.run([cxx, *_FLAGS, str(SOURCE), "-o", tmp], capture_output=True,
                               text=True)
            if r.returncode != 0:
                why = " ".join(r.stderr.split())[:300]
                BUILD_ERROR = f"{cxx} failed on {SOURCE.name}: {why}"
                return None
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        # torch first: libgomp.so.1 then resolves to the copy torch loaded (one OpenMP runtime)
        dll = ctypes.CDLL(str(lib))
    except OSError as e:
        BUILD_ERROR = f"{lib} does not load ({e})"
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    dll.qm_matmul.argtypes = [p, i32, i64, p, i32, i32, i32, p, p, p, p, p, i32, i64, i64, p, i32,
                              i64, p, i32]
    dll.qm_matmul.restype = i32
    dll.qm_dequant.argtypes = [p, i32, i32, i32, p, p, p, p, p, i32, i64, i64, p, i64, p, i32, i32]
    dll.qm_dequant.restype = i32
    dll.qm_matmul_a8.argtypes = dll.qm_matmul.argtypes
    dll.qm_matmul_a8.restype = i32
    dll.qm_has_avx512.restype = i32
    dll.qm_has_a8.restype = i32
    dll.qm_has_avx2.restype = i32
    BUILD_ERROR = None
    return dll


def ours_available() -> bool:
    """Whether our kernels are built and loaded (building them on the first call)."""
    return _library() is not None


def has_avx512() -> bool:
    lib = _library()
    return bool(lib is not None and lib.qm_has_avx512())


@functools.cache
def has_int8_activations() -> bool:
    """Whether our int8-activation kernel (:func:`matmul` with ``int8_activations``) is built:
    it needs AVX-512 VNNI, or AVX2 with FMA (the same integer sums, so the same outputs)."""
    lib = _library()
    return bool(lib is not None and lib.qm_has_a8())


def vector_path() -> str | None:
    """Which of our kernels' paths this CPU runs: ``"avx512"``, ``"avx2"`` (AVX2 with FMA,
    the AVX-512 path's arithmetic in 8-lane halves, the same outputs), ``"portable"`` (one
    weight at a time, the same outputs, many times slower), or None when ours are unavailable."""
    lib = _library()
    if lib is None:
        return None
    return "avx512" if lib.qm_has_avx512() else "avx2" if lib.qm_has_avx2() else "portable"


def check_int8_activations() -> None:
    """A RuntimeError saying why int8 activations (``weights="q4a8"``) cannot run here: they
    need our kernel (``SPECCASCADE_QUANT_KERNEL`` not ``torch``) on a CPU with AVX-512 VNNI
    or AVX2 + FMA."""
    if kernel_choice() == "torch":
        raise RuntimeError("weights='q4a8' needs our quantised kernel, but "
                           "SPECCASCADE_QUANT_KERNEL=torch")
    if not ours_available():
        raise RuntimeError(f"weights='q4a8' needs our quantised kernel, which is unavailable: "
                           f"{BUILD_ERROR}")
    if not has_int8_activations():
        raise RuntimeError("weights='q4a8' needs a CPU with AVX-512 VNNI or AVX2 + FMA "
                           "(use weights='q4')")


def use_ours(t: torch.Tensor) -> bool:
    """Whether a call on tensor ``t`` goes to our kernels under the current choice."""
    choice = kernel_choice()
    if choice == "torch" or t.device.type != "cpu":
        return False
    if choice == "ours" and not ours_available():
        raise RuntimeError(f"SPECCASCADE_QUANT_KERNEL=ours, but our kernels are unavailable: "
                           f"{BUILD_ERROR}")
    return ours_available()


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _layout_args(qw) -> tuple:
    """The kernels' arguments describing weight ``qw``: codes, bits, G, gps, D, sc, Mn, mq, qh,
    z, N, K."""
    return (_ptr(qw.codes), qw.bits, qw.G, qw.gps, _ptr(qw.D), _ptr(qw.sc), _ptr(qw.Mn),
            _ptr(qw.mq), _ptr(qw.qh), qw.z, qw.N, qw.K)


def _dtype_flag(t: torch.Tensor) -> int:
    if t.dtype == torch.bfloat16:
        return 1
    if t.dtype == torch.float32:
        return 0
    raise TypeError(f"quantised matmul: activations must be bfloat16 or float32, got {t.dtype}")


def matmul(x: torch.Tensor, qw, bias: torch.Tensor | None = None,
           int8_activations: bool = False) -> torch.Tensor:
    """``x [M, K] @ W^T (+ bias)`` with our kernel; the result has ``x``'s dtype.

    ``int8_activations``: each row of ``x`` is first quantised to int8 per block of 32 inputs
    (scale max|x| / 127, rounded to nearest even) and the groups' dot products are integer
    (AVX-512 VNNI, or AVX2's maddubs: the same sums), in the manner of llama.cpp (which
    quantises activations per 256 inputs for its K-quants and applies the offsets from the
    quantised sums; here per 32 inputs, with fp32 sums of the activations for the offsets);
    :func:`.formats.matmul_a8_reference` is the same quantity in PyTorch."""
    _check_call(qw, x.dtype, int8_activations)
    return _Prepared(qw, bias, x.dtype, int8_activations)(x)


def _check_call(qw, dtype, int8_activations: bool) -> None:
    """What a call of our kernel needs besides the kernel itself: activations in bf16 or fp32,
    and for int8 activations that kernel and K a multiple of 32 (a TypeError, RuntimeError or
    ValueError naming it)."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"quantised matmul: activations must be bfloat16 or float32, got {dtype}")
    if int8_activations and not has_int8_activations():
        raise RuntimeError("int8 activations need a CPU with AVX-512 VNNI or AVX2 + FMA")
    if int8_activations and qw.K % 32:
        raise ValueError(f"int8 activations: K={qw.K} must be a multiple of 32 ({qw})")


class _Prepared:
    """One weight's call of our kernel with every argument but the activations converted once
    (pointers, sizes, the kernel's entry point; nothing about ``x`` is checked but its
    contiguity; :func:`matmul` makes one per call, after its checks): a decoding
    step calls every layer, and inside a model the conversions and checks of :func:`matmul`
    (reading ``SPECCASCADE_QUANT_KERNEL`` among them) took several percent of a step. Made
    by :func:`prepare` after the checks; it holds the tensors it points into."""

    __slots__ = ("qw", "bias", "dtype", "fn", "flag", "args", "ptrs", "N")

    def __init__(self, qw, bias, dtype, int8_activations: bool):
        lib = _library()
        self.qw, self.bias, self.dtype, self.N = qw, bias, dtype, qw.N
        self.fn = lib.qm_matmul_a8 if int8_activations else lib.qm_matmul
        self.flag = 1 if dtype == torch.bfloat16 else 0
        self.args = _layout_args(qw)
        #: the data pointers of codes, D, sc, Mn, mq, qh (None where absent), to check reuse
        self.ptrs = (self.args[0], *self.args[4:9])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [M, K]`` (CPU, of the prepared dtype) times the weight, plus the bias."""
        if not x.is_contiguous():
            x = x.contiguous()
        b = self.bias
        if b is not None and (b.dtype != self.dtype or not b.is_contiguous()):
            b = b.to(self.dtype).contiguous()
        M = x.shape[0]
        y = torch.empty(M, self.N, dtype=self.dtype)
        rc = self.fn(x.data_ptr(), self.flag, M, *self.args, y.data_ptr(), self.flag, self.N,
                     _ptr(b), torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"{self.fn.__name__}: unsupported layout (code {rc}) for {self.qw}")
        return y


def prepare(qw, bias, dtype, int8_activations: bool = False) -> _Prepared:
    """The prepared call of ``qw`` (and ``bias``), a callable ``x [M, K] -> y [M, N]`` for
    ``x`` on the CPU in ``dtype``, after :func:`matmul`'s checks (a ValueError, TypeError or
    RuntimeError as it would raise), and for int8 activations after
    :func:`check_int8_activations` (the kernel choice is read here)."""
    if int8_activations:
        check_int8_activations()
    elif not ours_available():
        raise RuntimeError(f"our quantised kernels are unavailable: {BUILD_ERROR}")
    _check_call(qw, dtype, int8_activations)
    return _Prepared(qw, bias, dtype, int8_activations)


def dequant(qw, rows: torch.Tensor | None = None, dtype=torch.float32,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """The de-quantised weight ``[N, K]`` (or its rows ``rows``) in ``dtype`` (fp32 or bf16),
    with our kernel; into ``out`` (contiguous, ``[R, K]``) when given."""
    lib = _library()
    if rows is not None:
        rows = rows.to(torch.int64).contiguous()
    R = qw.N if rows is None else rows.numel()
    if out is None:
        out = torch.empty(R, qw.K, dtype=dtype)
    elif out.shape != (R, qw.K) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"dequant: out must be a contiguous {dtype} [{R}, {qw.K}] tensor")
    rc = lib.qm_dequant(*_layout_args(qw), _ptr(rows), R, _ptr(out), _dtype_flag(out),
                        torch.get_num_threads())
    if rc == -3:
        raise IndexError(f"dequant: a row index is outside [0, {qw.N})")
    if rc != 0:
        raise ValueError(f"qm_dequant: unsupported layout (code {rc}) for {qw}")
    return out


__all__ = ["BUILD_ERROR", "KERNELS", "check_int8_activations", "dequant", "has_avx512",
           "has_int8_activations", "kernel_choice", "matmul", "ours_available", "prepare",
           "use_ours", "vector_path"]
