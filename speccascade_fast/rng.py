"""Counter-based randomness (SEMANTICS §6).

Every random number is a pure function of ``(seed, position, stream, index)``:

* ``seed``     - the sequence's seed (int64; the engine derives one per sequence),
* ``position`` - the absolute position of the token being decided (int64 >= 0),
* ``stream``   - ``DRAFT`` (drafter sampling), ``ACCEPT`` (accept/reject uniforms) or
  ``RESIDUAL`` (residual and bonus sampling),
* ``index``    - the vocabulary id for Gumbel/exponential noise, 0 for the acceptance uniform.

The hash is SplitMix64's finaliser applied in a chain (all arithmetic modulo 2**64)::

    k = mix64(seed + GOLDEN); k = mix64(k ^ position); k = mix64(k ^ stream)
    h = mix64(k + (index + 1) * GOLDEN)
    u = ((h >> 12) + 0.5) * 2**-52          # exact in fp64: in [2**-53, 1 - 2**-53]

Because it needs no state, a row's randomness does not depend on the batch it rides in nor on
the backend: the torch version below, the C++ kernels and the Triton kernels compute the same
bits. Sampling from unnormalised weights ``w`` uses the exponential race
``argmax_v log w_v - log(-log u_v)`` (Gumbel-max), ties to the lowest id.
"""
from __future__ import annotations

import torch

DRAFT = 1
ACCEPT = 2
RESIDUAL = 3

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= (1 << 63) else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic)."""
    z = (z ^ _shr(z, 30)) * _signed(MUL1)
    z = (z ^ _shr(z, 27)) * _signed(MUL2)
    return z ^ _shr(z, 31)


def row_key(seed: torch.Tensor, position: torch.Tensor, stream: int) -> torch.Tensor:
    """Per-(seed, position, stream) key, int64, broadcasting ``seed`` against ``position``."""
    k = mix64(seed.to(torch.int64) + _signed(GOLDEN))
    k = mix64(k ^ position.to(torch.int64))
    return mix64(k ^ stream)


def uniform_from_key(key: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
    """float64 uniforms in (0, 1) for ``key`` (any shape) and ``index`` (broadcast)."""
    if not isinstance(index, torch.Tensor):
        index = torch.tensor(index, dtype=torch.int64, device=key.device)
    h = mix64(key + (index.to(torch.int64) + 1) * _signed(GOLDEN))
    return unit_interval(_shr(h, 12))


def unit_interval(bits52: torch.Tensor) -> torch.Tensor:
    """52 random bits -> float64 in [2**-53, 1 - 2**-53]; exact, so never 0 nor 1."""
    return (bits52.to(torch.float64) + 0.5) * (2.0 ** -52)


def uniform(seed: torch.Tensor, position: torch.Tensor, stream: int, index: torch.Tensor | int = 0):
    """Uniforms in (0, 1), float64, for broadcastable ``seed``/``position``/``index``."""
    return uniform_from_key(row_key(seed, position, stream), index)


def exponential_noise(seed: torch.Tensor, position: torch.Tensor, stream: int, vocab_size: int):
    """``-log u`` for every vocabulary id: float64 ``[..., V]`` for ``seed``/``position`` ``[...]``."""
    key = row_key(seed, position, stream).unsqueeze(-1)
    idx = torch.arange(vocab_size, dtype=torch.int64, device=key.device)
    return -torch.log(uniform_from_key(key, idx))


def race(log_weights: torch.Tensor, exp_noise: torch.Tensor) -> torch.Tensor:
    """Exponential race (Gumbel-max): ``argmax log w - log E`` over the last dim, ties to the
    lowest id. Entries with ``log w = -inf`` (weight 0) never win unless every weight is 0."""
    scores = log_weights - torch.log(exp_noise)
    return torch.argmax(scores, dim=-1)


# --- a pure-Python twin, used by the tests to pin the bits down ---------------------------------
def _mix64_int(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return z ^ (z >> 31)


def uniform_int(seed: int, position: int, stream: int, index: int) -> float:
    k = _mix64_int(seed + GOLDEN)
    k = _mix64_int(k ^ (position & MASK64))
    k = _mix64_int(k ^ stream)
    h = _mix64_int(k + (index + 1) * GOLDEN)
    return ((h >> 12) + 0.5) * 2.0 ** -52
