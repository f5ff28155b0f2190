"""Drop-in replacements for ``nn.Linear`` and ``nn.Embedding`` holding a :class:`QuantizedWeight`.

:class:`QuantLinear` multiplies with our kernel (:mod:`.kernels`) up to :data:`DIRECT_ROWS` rows
(decoding, verification blocks); more rows (a prompt's prefill) de-quantise the weight in slices
of :data:`SLICE_BYTES` to the activations' dtype and use ``F.linear`` (oneDNN/AMX), whose
numerics are those of a dense model with the de-quantised weights rounded to that dtype. On a
CPU without native bf16 matmuls (neither AVX512_BF16 nor AMX: :func:`native_bf16`), bf16
activations take that path in fp32 instead (the exact de-quantised weights, each output rounded
to bf16 once): there PyTorch's bf16 matmul converts its operands and ran 3.6× slower than fp32
at a prompt's size. With
PyTorch's kernels instead (``SPECCASCADE_QUANT_KERNEL=torch``, or ours unavailable): 4-bit
weights go through ``aten._weight_int4pack_mm_for_cpu`` (scale and zero point rounded to the
activations' dtype), per-channel int8 through ``aten._weight_int8pack_mm``, and the grouped
5-, 6- and 8-bit formats (Q5_0, Q6_K, Q8_0, ...), which no PyTorch kernel reads, are
re-quantised once to per-channel int8 (losing their block structure).
"""
from __future__ import annotations

import functools
import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .formats import TENSOR_FIELDS, QuantizedWeight, dequantize, int8_per_channel, unpack_nibbles

#: up to this many rows, the quantised kernel; beyond, de-quantise slices and F.linear
DIRECT_ROWS = 16
#: the size of one de-quantised slice of the weight on the F.linear path
SLICE_BYTES = 16 << 20

_FIELDS = TENSOR_FIELDS
_LAYOUT = ("kind", "bits", "G", "gps", "N", "K", "z")


class _Quantized(nn.Module):
    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        super().__init__()
        self.kind, self.bits, self.G, self.gps = qw.kind, qw.bits, qw.G, qw.gps
        self.N, self.K, self.z = qw.N, qw.K, qw.z
        self.dtype = dtype
        for name in _FIELDS:
            self.register_buffer(name, getattr(qw, name))
        self._torch_state = None  # PyTorch-kernel copies, made on first use
        self._qw = None  # (the buffers it was made of, the QuantizedWeight)
        self._direct = None  # QuantLinear: the kernels.prepare call of the last direct matmul
        self._set_handle()

    @property
    def qweight(self) -> QuantizedWeight:
        """The buffers as a :class:`QuantizedWeight`, made (and checked) once per set of
        buffers: a decoding step calls every layer, and the checks cost more than a small
        matmul."""
        held = self._buffers  # (plain dict lookups: nn.Module's __getattr__ is slow)
        bufs = tuple(held[k] for k in _FIELDS)
        cached = self._qw
        if cached is None or any(old is not new for old, new in zip(cached[0], bufs)):
            qw = QuantizedWeight(self.kind, self.bits, self.G, self.gps, self.N, self.K,
                                 **dict(zip(_FIELDS, bufs)), z=self.z)
            # (QuantizedWeight makes non-contiguous buffers contiguous: keep what it holds)
            cached = self._qw = (bufs, qw)
        return cached[1]

    @property
    def weight(self) -> torch.Tensor:
        """A meta tensor of the dense weight's shape and dtype (for code that reads
        ``.weight.shape``); the values are in :attr:`qweight`."""
        return torch.empty(self.N, self.K, dtype=self.dtype, device="meta")

    def _forget(self) -> None:
        self._torch_state = None
        self._qw = None
        self._direct = None

    def _apply(self, fn, recurse=True):
        self._forget()
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copies and pickles make their caches again from their tensors
        state = super().__getstate__().copy()
        state["_direct"] = state["_qw"] = state["_torch_state"] = None
        return state

    def _set_handle(self) -> None:
        """A new handle: the id by which :func:`quant_module` finds this module. It is a
        buffer, not an int attribute: a compiled graph takes it as an input, so the same graph
        serves every instance of a model (an int would be a constant of the graph, and each
        instance would compile it again)."""
        self.register_buffer("handle", torch.tensor(_register(self)), persistent=False)

    def __setstate__(self, state):  # a copy is a module of its own
        super().__setstate__(state)
        self._set_handle()

    #: an embedding (output ``[*ids.shape, K]`` in the module's dtype) or a linear layer
    #: (``[*x.shape[:-1], N]`` in ``x``'s dtype): the shape :func:`quant_module` reports
    _EMBEDDING = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque op (our kernels are ctypes calls)
            return torch.ops.speccascade.quant_module(
                x, self.handle, self.K if self._EMBEDDING else self.N, self._EMBEDDING,
                self.dtype)
        return self._forward(x)

    def __setattr__(self, name, value):
        if name in _FIELDS or name in ("bias", "int8_activations"):  # (made again on next use)
            self.__dict__["_direct"] = self.__dict__["_torch_state"] = None
        elif name in _LAYOUT:  # the layout the buffers are read with
            self.__dict__["_direct"] = self.__dict__["_torch_state"] = self.__dict__["_qw"] = None
        super().__setattr__(name, value)

    def dense(self, dtype=torch.float32, rows: slice | torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """De-quantised weights (all rows, a slice or an index tensor of rows) in ``dtype``
        (into ``out`` when given, with our kernel)."""
        qw = self.qweight
        if isinstance(rows, slice):
            rows = torch.arange(self.N, device=self.codes.device)[rows]
        if kernels.use_ours(self.codes) and dtype in (torch.float32, torch.bfloat16):
            return kernels.dequant(qw, rows, dtype, out)
        sub = qw if rows is None else qw.rows(rows)
        return dequantize(sub).to(dtype)


class QuantLinear(_Quantized):
    """``y = x W^T + b`` with ``W`` a :class:`QuantizedWeight`; ``x`` in bf16 or fp32."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.bfloat16, int8_activations: bool = False):
        super().__init__(qw, dtype)
        self.in_features, self.out_features = qw.K, qw.N
        #: up to DIRECT_ROWS rows, quantise the activations to int8 (see kernels.matmul)
        self.int8_activations = bool(int8_activations)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype),
                                                           requires_grad=False)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.K)
        M = x2.shape[0]
        direct = self._direct
        if (M <= DIRECT_ROWS and direct is not None and x2.dtype is direct.dtype and x2.is_cpu
                and direct.ptrs == _data_ptrs(self._buffers)
                and self._parameters.get("bias") is direct.bias):
            # the same call as the last one (checked then, SPECCASCADE_QUANT_KERNEL read
            # then): a decoding step calls every layer, and the checks below cost several
            # percent of it
            y = direct(x2)
        elif M <= DIRECT_ROWS and (self.int8_activations or kernels.use_ours(x2)):
            if x2.device.type != "cpu":  # (only int8 activations get here off the CPU)
                raise RuntimeError(f"int8 activations run on the CPU only, got {x2.device}")
            direct = self._direct = kernels.prepare(self.qweight, self.bias, x2.dtype,
                                                    self.int8_activations)
            y = direct(x2)
        elif M <= DIRECT_ROWS and x2.dtype in (torch.bfloat16, torch.float32):
            y = self._torch_matmul(x2)
        else:
            y = self._sliced_linear(x2)
        return y.view(*lead, self.N)

    def _sliced_linear(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.N, dtype=x.dtype, device=x.device)
        if x.dtype == torch.bfloat16 and x.is_cpu and not native_bf16():
            x = x.float()  # (y[:, n0:n1] = ... rounds each output to bf16 once)
        step = min(self.N, max(64, SLICE_BYTES // (self.K * x.element_size())))
        # one scratch slice per dtype, reused: a fresh one would page-fault on every call
        scratch = _scratch(step * self.K, x.dtype, x.device)
        for n0 in range(0, self.N, step):
            n1 = min(self.N, n0 + step)
            b = None if self.bias is None else self.bias[n0:n1].to(x.dtype)
            w = scratch[:(n1 - n0) * self.K].view(n1 - n0, self.K)
            w = self.dense(x.dtype, slice(n0, n1), out=w)
            y[:, n0:n1] = F.linear(x, w, b)
        return y

    def _torch_matmul(self, x: torch.Tensor) -> torch.Tensor:
        st = self._torch_state
        if st is None or st[0] != x.dtype:
            st = self._torch_state = (x.dtype, *_torch_weights(self.qweight, x.dtype))
        _, kind, a, b = st
        if kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, a, 32, b)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x, a, b)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        a8 = ", int8 activations" if self.int8_activations else ""
        return (f"in_features={self.K}, out_features={self.N}, {self.kind}{a8}, "
                f"bias={self.bias is not None}")


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512_BF16 or AMX-BF16 in /proc/cpuinfo's
    x86 ``flags``; True where there is no such line to read, as off Linux or on ARM, which
    keeps bf16 matmuls in bf16 there)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or "avx512_bf16" in flags or "amx_bf16" in flags


def _data_ptrs(held: dict) -> tuple:
    """The data pointers of a layer's codes, D, sc, Mn, mq, qh (None where absent): any tensor
    replaced, or given new storage, since its call was prepared changes them. (Spelt out: it
    runs on every call, and a generator over _FIELDS costs twice the time.)"""
    c, d, s, m, q, h = held["codes"], held["D"], held["sc"], held["Mn"], held["mq"], held["qh"]
    return (c.data_ptr(), d.data_ptr(), None if s is None else s.data_ptr(),
            None if m is None else m.data_ptr(), None if q is None else q.data_ptr(),
            None if h is None else h.data_ptr())


_SCRATCH: dict = {}


def _scratch(numel: int, dtype, device) -> torch.Tensor:
    key = (dtype, str(device))
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


def _torch_weights(qw: QuantizedWeight, dtype) -> tuple[str, torch.Tensor, torch.Tensor]:
    """The operands of PyTorch's kernels for ``qw``: ("int4", int4pack, scales_and_zeros) or
    ("int8", int8 [N, K], per-channel scales)."""
    if qw.bits == 4 and qw.N % 16 == 0:
        s, o = qw.scales_offsets()
        # ours: w = s (q - z) - o; aten's int4 convention: w = (q - 8) * scale + zero
        sz = torch.stack([s, (8 - qw.z) * s - o], dim=-1).transpose(0, 1).contiguous().to(dtype)
        stored = unpack_nibbles(qw.codes, None, 4, qw.K)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(stored, 1)
        return "int4", packed, sz
    if qw.kind != "int8":
        qw = int8_per_channel(dequantize(qw))  # no PyTorch kernel reads the block structure
    return "int8", qw.codes, qw.D[:, 0].to(dtype).contiguous()


class QuantEmbedding(_Quantized):
    """``nn.Embedding`` whose table is a :class:`QuantizedWeight`: the looked-up rows are
    de-quantised (exactly, then rounded to ``dtype``)."""

    _EMBEDDING = True

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype = torch.bfloat16,
                 padding_idx: int | None = None):
        super().__init__(qw, dtype)
        self.num_embeddings, self.embedding_dim = qw.N, qw.K
        self.padding_idx = padding_idx

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.dense(self.dtype, ids.reshape(-1).to(torch.int64))
        return rows.view(*ids.shape, self.K)

    def extra_repr(self) -> str:
        return f"{self.N}, {self.K}, {self.kind}"


#: handle -> the module (weakly): what the compiled graphs' quant_module ops call
_MODULES: weakref.WeakValueDictionary[int, _Quantized] = weakref.WeakValueDictionary()
_NEXT = itertools.count()


def _register(module: _Quantized) -> int:
    h = next(_NEXT)
    _MODULES[h] = module
    return h


@torch.library.custom_op("speccascade::quant_module", mutates_args=())
def quant_module(x: torch.Tensor, handle: torch.Tensor, n: int, embedding: bool,
                 dtype: torch.dtype) -> torch.Tensor:
    """The forward of the quantised module whose handle is ``handle`` as one operator, so that
    ``torch.compile`` keeps the rest of a model in one graph around our kernels (which it
    cannot trace: ctypes calls). ``n``, ``embedding`` and ``dtype`` give the output's shape and
    dtype without the module: a linear layer's ``[*x.shape[:-1], n]`` in ``x``'s dtype, an
    embedding's ``[*x.shape, n]`` in ``dtype``."""
    return _MODULES[int(handle)]._forward(x)


@quant_module.register_fake
def _(x, handle, n, embedding, dtype):
    if embedding:
        return x.new_empty((*x.shape, n), dtype=dtype)
    return x.new_empty((*x.shape[:-1], n))


__all__ = ["DIRECT_ROWS", "QuantEmbedding", "QuantLinear", "SLICE_BYTES", "native_bf16"]
