"""Quantised weights as GGUF stores them, in one layout every kernel of this package reads.

A :class:`QuantizedWeight` is a ``[N, K]`` matrix (``N`` outputs, ``K`` inputs) of integer codes
with, per group of ``G`` consecutive inputs of a row, a scale and an offset:

    w[n, k] = fma(s, code[n, k], -o)      (fp32)
    s = D[n, g // gps] * sc[n, g]         (sc absent: 1)
    o = Mn[n, g // gps] * mq[n, g]        (Mn absent: 0; mq absent: 1)

``D``/``Mn`` are fp32 per "super-block" of ``G * gps`` inputs; ``sc``/``mq`` int8 per group.
4-bit codes (``bits = 4``, ``G = 32``) are packed two per byte, ``codes[n, 16 g + j]`` holding the
codes of inputs ``32 g + j`` (low nibble) and ``32 g + 16 + j`` (high nibble); 8-bit codes are
int8 ``[N, K]``.

GGUF's block types map onto it without any rounding (:func:`from_gguf`):

====== ==== === === ===================================== =====================================
type   bits  G  gps s                                      o
====== ==== === === ===================================== =====================================
Q4_0    4   32   1  d                                      8 d           (code = q in 0..15)
Q4_1    4   32   1  d                                      -m
Q4_K    4   32   8  d * sc (6-bit)                         dmin * m (6-bit)
Q5_0    8   32   1  d                                      0             (code = q - 16)
Q5_1    8   32   1  d                                      -m            (code = q in 0..31)
Q5_K    8   32   8  d * sc                                 dmin * m      (code = q in 0..31)
Q6_K    8   16  16  d * sc (int8)                          0             (code = q - 32)
Q8_0    8   32   1  d                                      0
====== ==== === === ===================================== =====================================

``d``, ``dmin``, ``m`` are the blocks' fp16 values; their products with the small integer
scales are exact in fp32, so :func:`dequantize` (and every kernel) reproduces gguf-py's and
ggml's fp32 reference de-quantisation exactly. Two formats are made from dense weights:
``int8`` (symmetric, one scale per output channel: absmax / 127) and ``rtn4`` (4-bit,
asymmetric, groups of 32: scale (max - min) / 15 and offset -min, rounded to nearest; for models
that come without a GGUF file).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

QK_K = 256


@dataclasses.dataclass
class QuantizedWeight:
    kind: str
    bits: int
    G: int
    gps: int
    N: int
    K: int
    codes: torch.Tensor
    D: torch.Tensor
    sc: torch.Tensor | None = None
    Mn: torch.Tensor | None = None
    mq: torch.Tensor | None = None

    def __post_init__(self):
        if self.bits not in (4, 8) or (self.bits == 4 and self.G != 32) or self.G not in (16, 32):
            raise ValueError(f"{self.kind}: unsupported layout bits={self.bits}, G={self.G}")
        if self.K % (self.G * self.gps):
            raise ValueError(f"{self.kind}: K={self.K} is not a multiple of G*gps="
                             f"{self.G * self.gps}")
        ng, nsb = self.K // self.G, self.K // (self.G * self.gps)
        width = self.K // 2 if self.bits == 4 else self.K
        want = {"codes": ((self.N, width), (torch.uint8, torch.int8)),
                "D": ((self.N, nsb), (torch.float32,)), "sc": ((self.N, ng), (torch.int8,)),
                "Mn": ((self.N, nsb), (torch.float32,)), "mq": ((self.N, ng), (torch.int8,))}
        for name, (shape, dtypes) in want.items():
            t = getattr(self, name)
            if t is None:
                continue
            if tuple(t.shape) != shape or t.dtype not in dtypes:
                raise ValueError(f"{self.kind}: {name} has shape {tuple(t.shape)} and dtype "
                                 f"{t.dtype}, expected {shape} and {dtypes[0]}")
            setattr(self, name, t.contiguous())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by field name (those present)."""
        return {k: getattr(self, k) for k in ("codes", "D", "sc", "Mn", "mq")
                if getattr(self, k) is not None}

    def meta(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "G": self.G, "gps": self.gps,
                "N": self.N, "K": self.K}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def rows(self, index: torch.Tensor) -> QuantizedWeight:
        """The rows ``index`` (a permutation, say) as a new weight."""
        sel = {k: v[index] for k, v in self.tensors().items()}
        return dataclasses.replace(self, N=int(index.numel()), **sel)

    def scales_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group ``s`` and ``o``, fp32 ``[N, K / G]`` (exact)."""
        D = self.D.repeat_interleave(self.gps, dim=1)
        s = D * self.sc.float() if self.sc is not None else D
        if self.Mn is None:
            o = torch.zeros_like(s)
        else:
            Mn = self.Mn.repeat_interleave(self.gps, dim=1)
            o = Mn * self.mq.float() if self.mq is not None else Mn
        return s, o

    def unpacked_codes(self) -> torch.Tensor:
        """The codes as int32 ``[N, K]`` in input order."""
        if self.bits == 8:
            return self.codes.view(torch.int8).to(torch.int32)
        c = self.codes.view(self.N, self.K // 32, 16)
        return torch.cat([c & 15, c >> 4], dim=2).reshape(self.N, self.K).to(torch.int32)

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.kind}, [{self.N}, {self.K}], bits={self.bits}, "
                f"G={self.G}, gps={self.gps})")


def dequantize(qw: QuantizedWeight) -> torch.Tensor:
    """The fp32 weights ``[N, K]`` in torch ops (the reference the kernels are tested against):
    ``fma(s, code, -o)``, rounded once like the kernels (``s * code`` is exact)."""
    s, o = qw.scales_offsets()
    c = qw.unpacked_codes().double().view(qw.N, -1, qw.G)
    w = c * s.double()[..., None] - o.double()[..., None]  # exact in fp64, one rounding below
    return w.float().view(qw.N, qw.K)


# ---------------------------------------------------------------------------------------------
# from GGUF blocks


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _pack4(codes: np.ndarray) -> np.ndarray:
    """``[..., 32]`` codes 0..15 per group -> ``[..., 16]`` bytes (j | j + 16 << 4)."""
    return (codes[..., :16] | (codes[..., 16:] << 4)).astype(np.uint8)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """GGML's nibble layout: ``qs [n, c, width]`` -> codes ``[n, c, 2, width]`` (low nibbles
    first: inputs ``2 c width + j``, then the high nibbles: ``(2 c + 1) width + j``)."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


SUPPORTED_GGUF = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")


def from_gguf(kind: str, data: np.ndarray, N: int, K: int) -> QuantizedWeight:
    """A GGUF tensor's raw blocks (``data``: uint8, ``N`` rows of ``K`` weights, as
    ``gguf.GGUFReader`` gives a quantised tensor) as a :class:`QuantizedWeight`, without
    rounding anything."""
    if kind not in SUPPORTED_GGUF:
        raise ValueError(f"GGUF type {kind} is not supported (supported: "
                         f"{', '.join(SUPPORTED_GGUF)})")
    b = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)
    t = lambda a, dt=None: torch.from_numpy(np.ascontiguousarray(a if dt is None else a.astype(dt)))
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        size = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}[kind]
        nb = K // 32
        blk = b.reshape(N, nb, size)
        d = _f16(blk[..., 0:2])[..., 0]
        if kind == "Q8_0":
            codes = blk[..., 2:].view(np.int8).reshape(N, K)
            return QuantizedWeight(kind, 8, 32, 1, N, K, t(codes), t(d))
        off = 4 if kind in ("Q4_1", "Q5_1") else 2
        m = _f16(blk[..., 2:4])[..., 0] if off == 4 else None
        if kind in ("Q4_0", "Q4_1"):
            codes = blk[..., off:]  # ggml's Q4_0/Q4_1 nibble layout is ours already
            Mn = 8.0 * d if kind == "Q4_0" else -m
            return QuantizedWeight(kind, 4, 32, 1, N, K, t(codes.reshape(N, K // 2)), t(d),
                                   Mn=t(Mn, np.float32))
        qh = blk[..., off:off + 4].copy().view(np.uint32)  # [N, nb, 1]
        qs = blk[..., off + 4:]
        low = _nibbles(qs, 16).reshape(N, nb, 32)
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        q = (low | (high << 4)).astype(np.int16)
        if kind == "Q5_0":
            return QuantizedWeight(kind, 8, 32, 1, N, K, t((q - 16).reshape(N, K), np.int8), t(d))
        return QuantizedWeight(kind, 8, 32, 1, N, K, t(q.reshape(N, K), np.int8), t(d),
                               Mn=t(-m, np.float32))
    nb = K // QK_K
    if kind in ("Q4_K", "Q5_K"):
        size = 144 if kind == "Q4_K" else 176
        blk = b.reshape(N * nb, size)
        from gguf.quants import Q4_K as _Q4K

        d, dmin = _f16(blk[:, 0:2])[:, 0], _f16(blk[:, 2:4])[:, 0]
        sc, m = _Q4K.get_scale_min(blk[:, 4:16])
        if kind == "Q4_K":
            q = _nibbles(blk[:, 16:].reshape(-1, 4, 32), 32).reshape(-1, 8, 32)
            codes = _pack4(q).reshape(N, K // 2)
            bits = 4
        else:
            qh = blk[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            ql = _nibbles(blk[:, 48:].reshape(-1, 4, 32), 32).reshape(-1, 8, 32)
            codes = (ql | ((qh & 1) << 4)).reshape(N, K).view(np.int8)
            bits = 8
        return QuantizedWeight(kind, bits, 32, 8, N, K, t(codes), t(d.reshape(N, nb)),
                               sc=t(sc.reshape(N, K // 32), np.int8),
                               Mn=t(dmin.reshape(N, nb)), mq=t(m.reshape(N, K // 32), np.int8))
    # Q6_K: ql [128], qh [64], scales int8 [16], d fp16
    blk = b.reshape(N * nb, 210)
    ql = _nibbles(blk[:, :128].reshape(-1, 2, 64), 64).reshape(-1, 8, 32)
    qh = (blk[:, 128:192].reshape(-1, 2, 1, 32)
          >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (ql | (qh.reshape(-1, 8, 32) << 4)).astype(np.int16) - 32
    sc = blk[:, 192:208].view(np.int8)
    d = _f16(blk[:, 208:210])[:, 0]
    return QuantizedWeight(kind, 8, 16, 16, N, K, t(q.reshape(N, K), np.int8),
                           t(d.reshape(N, nb)), sc=t(sc.reshape(N, K // 16)))


# ---------------------------------------------------------------------------------------------
# from dense weights


_ROWS = 4096  # rows quantised at a time (bounds the fp32 temporaries of a vocabulary-sized head)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x [M, K]`` (``K`` a multiple of 32) quantised to int8 per block of 32 inputs, as
    the int8-activation kernel does: ``d = max|x| / 127`` and ``q = round(x * (127 / max|x|))``
    (nearest even, fp32; a block of zeros, or one so small that ``127 / max|x|`` overflows, has
    ``d = 0``, ``q = 0``; the kernel makes a block with an infinity or a NaN give NaN outputs).
    Returns ``q`` (int8 ``[M, K]``) and ``d`` (fp32 ``[M, K // 32]``)."""
    M, K = x.shape
    if K % 32:
        raise ValueError(f"quantize_activations: K={K} is not a multiple of 32")
    xb = x.float().reshape(M, K // 32, 32)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.tensor(127.0) / amax
    zero = (amax == 0) | inv.isinf()
    inv = torch.where(zero, torch.zeros_like(inv), inv)
    q = torch.round(xb * inv).to(torch.int8).reshape(M, K)
    d = torch.where(zero, torch.zeros_like(amax), amax / 127.0)
    return q, d.squeeze(-1)


def matmul_a8_reference(x: torch.Tensor, qw: QuantizedWeight,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with int8 activations (:func:`quantize_activations`), in float64:
    ``sum_g s_g d_b (sum_{k in g} code_k q_k) - sum_g o_g (sum_{k in g} x_k)``, the quantity the
    int8-activation kernel computes in fp32."""
    M, K = x.shape
    q, d = quantize_activations(x)
    s, o = qw.scales_offsets()  # [N, K // G]
    codes = qw.unpacked_codes().double()  # [N, K]
    G = qw.G
    xq = q.double() * d.double().repeat_interleave(32, dim=1)  # d_b q_k, exact in float64
    # sum over each group g of code_k d_b q_k (d_b is constant within a group: G divides 32)
    dots = (codes.view(1, qw.N, K // G, G) * xq.view(M, 1, K // G, G)).sum(-1)  # [M, N, ng]
    gsum = x.float().double().view(M, K // G, G).sum(-1)  # [M, ng]
    y = (dots * s.double()).sum(-1) - gsum @ o.double().T
    if bias is not None:
        y = y + bias.double()
    return y


def int8_per_channel(w: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8, one scale per output row (absmax / 127), as :class:`Int8Linear`."""
    w = w.detach()
    N, K = w.shape
    if K % 32:
        raise ValueError(f"int8: K={K} is not a multiple of 32")
    codes = torch.empty(N, K, dtype=torch.int8)
    scales = torch.empty(N, 1, dtype=torch.float32)
    for i in range(0, N, _ROWS):
        c = w[i:i + _ROWS].float()
        s = c.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
        codes[i:i + _ROWS] = torch.round(c / s).clamp(-127, 127)
        scales[i:i + _ROWS] = s
    return QuantizedWeight("int8", 8, 32, K // 32, N, K, codes, scales)


def rtn4(w: torch.Tensor) -> QuantizedWeight:
    """4-bit round-to-nearest, groups of 32 inputs, asymmetric: ``s = (max - min) / 15``,
    ``o = -min``, codes ``round((w - min) / s)`` in 0..15."""
    w = w.detach()
    N, K = w.shape
    if K % 32:
        raise ValueError(f"rtn4: K={K} is not a multiple of 32")
    packed = torch.empty(N, K // 2, dtype=torch.uint8)
    scales = torch.empty(N, K // 32)
    offsets = torch.empty(N, K // 32)
    for i in range(0, N, _ROWS):
        g = w[i:i + _ROWS].float().view(-1, K // 32, 32)
        lo, hi = g.amin(dim=2), g.amax(dim=2)
        s = ((hi - lo) / 15).clamp(min=1e-12)
        codes = torch.round((g - lo[..., None]) / s[..., None]).clamp(0, 15).to(torch.uint8)
        packed[i:i + _ROWS] = (codes[..., :16] | (codes[..., 16:] << 4)).view(-1, K // 2)
        scales[i:i + _ROWS], offsets[i:i + _ROWS] = s, -lo
    return QuantizedWeight("rtn4", 4, 32, 1, N, K, packed, scales, Mn=offsets)


__all__ = ["QuantizedWeight", "SUPPORTED_GGUF", "dequantize", "from_gguf", "int8_per_channel",
           "rtn4"]
