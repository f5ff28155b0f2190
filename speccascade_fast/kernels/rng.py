"""The counter-based RNG of :mod:`speccascade_fast.rng`, bit for bit, in Triton.

SplitMix64's finaliser in a chain on uint64 (wrapping multiply, logical shifts)::

    k = mix64(seed + GOLDEN); k = mix64(k ^ position); k = mix64(k ^ stream)
    h = mix64(k + (index + 1) * GOLDEN)
    u = ((h >> 12) + 0.5) * 2**-52                       # float64, exact, in (0, 1)

``seed`` and ``position`` are int64 (bit-cast to uint64, as the torch version's wrapping int64
arithmetic does). :func:`uniform_kernel` exposes the bits to the tests.
"""
from __future__ import annotations

import triton
import triton.language as tl

DRAFT = tl.constexpr(1)
ACCEPT = tl.constexpr(2)
RESIDUAL = tl.constexpr(3)

GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)
MUL1 = tl.constexpr(0xBF58476D1CE4E5B9)
MUL2 = tl.constexpr(0x94D049BB133111EB)
TWO_M52 = tl.constexpr(2.220446049250313e-16)  # 2**-52


@triton.jit
def mix64(z):
    """SplitMix64 finaliser on uint64 (any shape)."""
    z = (z ^ (z >> 30)) * MUL1
    z = (z ^ (z >> 27)) * MUL2
    return z ^ (z >> 31)


@triton.jit
def row_key(seed, position, STREAM: tl.constexpr):
    """uint64 key of (seed, position, stream); ``seed``/``position`` int64."""
    k = mix64(seed.to(tl.uint64, bitcast=True) + GOLDEN)
    k = mix64(k ^ position.to(tl.uint64, bitcast=True))
    return mix64(k ^ STREAM)


@triton.jit
def bits52(key, index):
    """The 52 random bits of ``(key, index)`` (uint64, ``index`` a non-negative int of any width)."""
    h = mix64(key + (index.to(tl.int64).to(tl.uint64, bitcast=True) + 1) * GOLDEN)
    return h >> 12


@triton.jit
def uniform(key, index):
    """float64 uniforms in (0, 1), the same bits as ``rng.uniform_from_key``."""
    return (bits52(key, index).to(tl.float64) + 0.5) * TWO_M52


@triton.jit
def uniform_kernel(seed_ptr, pos_ptr, idx_ptr, out_ptr, N, STREAM: tl.constexpr,
                   BLOCK: tl.constexpr):
    """out[i] = rng.uniform(seed[i], pos[i], STREAM, idx[i]) (for the tests)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    seed = tl.load(seed_ptr + offs, mask=ok, other=0)
    pos = tl.load(pos_ptr + offs, mask=ok, other=0)
    idx = tl.load(idx_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, uniform(row_key(seed, pos, STREAM), idx), mask=ok)
