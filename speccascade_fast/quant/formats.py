"""Quantised weights as GGUF stores them, in one layout every kernel of this package reads.

A :class:`QuantizedWeight` is a ``[N, K]`` matrix (``N`` outputs, ``K`` inputs) of integer codes
with, per group of ``G`` consecutive inputs of a row, a scale and an offset:

    w[n, k] = fma(s, code[n, k], -o)      (fp32)
    s = D[n, g // gps] * sc[n, g]         (sc absent: 1)
    o = Mn[n, g // gps] * mq[n, g]        (Mn absent: 0; mq absent: 1)

``D``/``Mn`` are fp32 per "super-block" of ``G * gps`` inputs; ``sc``/``mq`` int8 per group.
4-bit codes (``bits = 4``, ``G = 32``) are packed two per byte, ``codes[n, 16 u + j]`` holding the
codes of inputs ``32 u + j`` (low nibble) and ``32 u + 16 + j`` (high nibble); 8-bit codes are
int8 ``[N, K]``. 5- and 6-bit codes (``bits = 5, 6``; ``G`` 32 or 16) keep their low four bits
in the same nibble layout and their bits 4 (and 5) in bit planes ``qh`` (``[N, ceil(K / 128) *
16 * (bits - 4)]`` uint8, see :func:`pack_nibbles`): 5 and 6 bits per code as ggml stores them
(6.0 and 6.6 bits per weight with the factors); the code is the stored value minus ``z``
(Q5_0: 16, Q6_K: 32).

GGUF's block types map onto it without any rounding (:func:`from_gguf`):

====== ==== === === ===================================== =====================================
type   bits  G  gps s                                      o
====== ==== === === ===================================== =====================================
Q4_0    4   32   1  d                                      8 d           (code = q in 0..15)
Q4_1    4   32   1  d                                      -m
Q4_K    4   32   8  d * sc (6-bit)                         dmin * m (6-bit)
Q5_0    5   32   1  d                                      0             (code = q - 16, z 16)
Q5_1    5   32   1  d                                      -m            (code = q in 0..31)
Q5_K    5   32   8  d * sc                                 dmin * m      (code = q in 0..31)
Q6_K    6   16  16  d * sc (int8)                          0             (code = q - 32, z 32)
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
    qh: torch.Tensor | None = None  # bits 5, 6: the high bit planes
    z: int = 0  # bits 4, 5, 6: code = stored value - z

    def __post_init__(self):
        if not ((self.bits == 4 and self.G == 32) or (self.bits in (5, 6, 8)
                                                       and self.G in (16, 32))):
            raise ValueError(f"{self.kind}: unsupported layout bits={self.bits}, G={self.G}")
        nibbles = self.bits in (4, 5, 6)
        if self.K % (self.G * self.gps) or (nibbles and self.K % 32):
            raise ValueError(f"{self.kind}: K={self.K} must be a multiple of G*gps="
                             f"{self.G * self.gps}" + (" and of 32" if nibbles else ""))
        if isinstance(self.z, bool) or not isinstance(self.z, (int, np.integer)):
            raise ValueError(f"{self.kind}: z must be an int, got {self.z!r}")
        self.z = int(self.z)
        if not (0 <= self.z < (1 << self.bits) if nibbles else self.z == 0):
            raise ValueError(f"{self.kind}: z={self.z} outside [0, {1 << self.bits})"
                             if nibbles else f"{self.kind}: z={self.z} with 8-bit codes")
        if (self.qh is not None) != (self.bits in (5, 6)):
            raise ValueError(f"{self.kind}: bits={self.bits} " + (
                "needs its high bit planes qh" if self.qh is None else "has no high bit planes"))
        ng, nsb = self.K // self.G, self.K // (self.G * self.gps)
        width = self.K // 2 if nibbles else self.K
        # (nibbles are read as unsigned bytes; 8-bit codes as signed)
        want = {"codes": ((self.N, width), (torch.uint8,) if nibbles else (torch.int8, torch.uint8)),
                "D": ((self.N, nsb), (torch.float32,)), "sc": ((self.N, ng), (torch.int8,)),
                "Mn": ((self.N, nsb), (torch.float32,)), "mq": ((self.N, ng), (torch.int8,)),
                "qh": ((self.N, _planes_width(self.K, self.bits)), (torch.uint8,))}
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
        return {k: getattr(self, k) for k in TENSOR_FIELDS if getattr(self, k) is not None}

    def meta(self) -> dict:
        return {"kind": self.kind, "bits": self.bits, "G": self.G, "gps": self.gps,
                "N": self.N, "K": self.K, "z": self.z}

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
        return unpack_nibbles(self.codes, self.qh, self.bits, self.K) - self.z

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


TENSOR_FIELDS = ("codes", "D", "sc", "Mn", "mq", "qh")


def _planes_width(K: int, bits: int) -> int:
    """Bytes per row of the high bit planes of ``bits``-bit nibble codes (0 for 4 bits)."""
    return -(-K // 128) * 16 * (bits - 4) if bits in (5, 6) else 0


def pack_nibbles(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Stored values ``[N, K]`` (``0 <= v < 2**bits``, ``K`` a multiple of 32) in the nibble
    layout: ``codes [N, K / 2]`` (bits 0..3) and, for 5 and 6 bits, the planes ``qh`` of bits 4
    and 5: per chunk of 128 inputs (64 code bytes) and plane ``p``, a little-endian uint64 for
    the low nibbles' inputs (bit ``16 r + j``: input ``32 (4 c + r) + j``) then one for the high
    nibbles' (``+ 16``); the kernels add them to the nibbles with one masked add per 64 bytes."""
    v = np.asarray(values)
    if v.ndim != 2 or v.shape[1] % 32 or v.size and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"pack_nibbles: values must be [N, K] (K a multiple of 32) in "
                         f"[0, {1 << bits}), got shape {v.shape}")
    v = v.astype(np.uint8)
    N, K = v.shape
    units = v.reshape(N, K // 32, 32)
    codes = _pack4(units & 15).reshape(N, K // 2)
    if bits == 4:
        return codes, None
    C = -(-K // 128)
    pad = np.zeros((N, 4 * C, 32), dtype=np.uint8)
    pad[:, :K // 32] = units
    planes = []
    for p in range(bits - 4):
        b = ((pad >> (4 + p)) & 1).reshape(N, C, 4, 2, 16)  # [chunk, quarter, half, j]
        for half in (0, 1):
            planes.append(np.packbits(b[:, :, :, half, :].reshape(N, C, 64), axis=-1,
                                      bitorder="little"))  # [N, C, 8]
    return codes, np.concatenate(planes, axis=-1).reshape(N, C * 16 * (bits - 4))


def unpack_nibbles(codes: torch.Tensor, qh: torch.Tensor | None, bits: int, K: int) \
        -> torch.Tensor:
    """The stored values (int32 ``[N, K]``, input order) of :func:`pack_nibbles`'s layout."""
    N = codes.shape[0]
    c = codes.view(N, K // 32, 16).to(torch.int32)
    v = torch.cat([c & 15, c >> 4], dim=2)  # [N, units, 32]
    if bits == 4:
        return v.reshape(N, K)
    C = -(-K // 128)
    h = qh.view(N, C, bits - 4, 2, 8)
    shifts = torch.arange(8, dtype=torch.int32)
    for p in range(bits - 4):
        bit = (h[:, :, p].to(torch.int32)[..., None] >> shifts) & 1  # [N, C, half, 8, 8]
        bit = bit.reshape(N, C, 2, 4, 16).transpose(2, 3).reshape(N, 4 * C, 32)[:, :K // 32]
        v = v + (bit << (4 + p))
    return v.reshape(N, K)


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
        codes, qh5 = pack_nibbles((low | (high << 4)).reshape(N, K), 5)
        if kind == "Q5_0":
            return QuantizedWeight(kind, 5, 32, 1, N, K, t(codes), t(d), qh=t(qh5), z=16)
        return QuantizedWeight(kind, 5, 32, 1, N, K, t(codes), t(d), Mn=t(-m, np.float32),
                               qh=t(qh5))
    nb = K // QK_K
    if kind in ("Q4_K", "Q5_K"):
        size = 144 if kind == "Q4_K" else 176
        blk = b.reshape(N * nb, size)
        from gguf.quants import Q4_K as _Q4K

        d, dmin = _f16(blk[:, 0:2])[:, 0], _f16(blk[:, 2:4])[:, 0]
        sc, m = _Q4K.get_scale_min(blk[:, 4:16])
        if kind == "Q4_K":
            bits, values = 4, _nibbles(blk[:, 16:].reshape(-1, 4, 32), 32)
        else:
            qh = blk[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            ql = _nibbles(blk[:, 48:].reshape(-1, 4, 32), 32).reshape(-1, 8, 32)
            bits, values = 5, ql | ((qh & 1) << 4)
        codes, planes = pack_nibbles(values.reshape(N, K), bits)
        return QuantizedWeight(kind, bits, 32, 8, N, K, t(codes), t(d.reshape(N, nb)),
                               sc=t(sc.reshape(N, K // 32), np.int8), Mn=t(dmin.reshape(N, nb)),
                               mq=t(m.reshape(N, K // 32), np.int8),
                               qh=None if planes is None else t(planes))
    # Q6_K: ql [128], qh [64], scales int8 [16], d fp16
    blk = b.reshape(N * nb, 210)
    ql = _nibbles(blk[:, :128].reshape(-1, 2, 64), 64).reshape(-1, 8, 32)
    qh = (blk[:, 128:192].reshape(-1, 2, 1, 32)
          >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    codes, qh6 = pack_nibbles((ql | (qh.reshape(-1, 8, 32) << 4)).reshape(N, K), 6)
    sc = blk[:, 192:208].view(np.int8)
    d = _f16(blk[:, 208:210])[:, 0]
    return QuantizedWeight(kind, 6, 16, 16, N, K, t(codes), t(d.reshape(N, nb)),
                           sc=t(sc.reshape(N, K // 16)), qh=t(qh6), z=32)


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


__all__ = ["QuantizedWeight", "SUPPORTED_GGUF", "TENSOR_FIELDS", "dequantize", "from_gguf",
           "int8_per_channel", "pack_nibbles", "rtn4", "unpack_nibbles"]
