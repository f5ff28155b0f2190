"""Input checks shared by the public functions. Each raises ``ValueError`` naming the argument
and what is allowed; nothing is clipped silently."""
from __future__ import annotations

import math

import torch


def logits(name: str, x, dims: int | None = None) -> torch.Tensor:
    """Floating logits with no NaN, no +inf, and at least one finite entry per row
    (-inf masks a token and is legal)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of logits, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions, got shape {tuple(x.shape)}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty vocabulary dimension, got {tuple(x.shape)}")
    # One pass: a row's max is finite iff the row has no NaN (max propagates it), no +inf and
    # at least one finite entry. Only a bad tensor pays for the scans that say what is wrong.
    if x.numel() == 0 or bool(torch.isfinite(torch.amax(x, dim=-1)).all()):
        return x
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if torch.isposinf(x).any():
        raise ValueError(f"{name} contains +inf (only -inf, to mask a token, is allowed)")
    raise ValueError(f"{name} has a row where every logit is -inf (no token is possible)")


#: the smallest positive temperature: below it 1/T and the scaled logits overflow in the
#: kernels' float32 (and every law is one-hot anyway); 0 is greedy decoding
MIN_TEMPERATURE = 1e-6
#: seeds and positions are int64 counters
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def temperature(t, shape: tuple[int, ...] = (), device=None) -> torch.Tensor:
    """A float64 tensor broadcast to ``shape`` from a number or a tensor of T = 0 (greedy) or
    T >= :data:`MIN_TEMPERATURE`."""
    if isinstance(t, bool) or not isinstance(t, (int, float, torch.Tensor)):
        raise ValueError(f"temperature must be a number >= 0 or a tensor, got {type(t).__name__}")
    tt = torch.as_tensor(t, dtype=torch.float64, device=device)
    if not bool(torch.isfinite(tt).all()) or bool((tt < 0).any()):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {t!r}")
    if bool(((tt > 0) & (tt < MIN_TEMPERATURE)).any()):
        raise ValueError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE:g} (smaller ones "
                         f"overflow 1/T; their law is greedy anyway), got {t!r}")
    try:
        return torch.broadcast_to(tt, shape)
    except RuntimeError:
        raise ValueError(f"temperature of shape {tuple(tt.shape)} does not fit {shape}") from None


def alpha_tensor(a, shape: tuple[int, ...], device=None) -> torch.Tensor:
    """float64 alpha broadcast to ``shape`` (rules that ignore it get zeros)."""
    tt = torch.as_tensor(0.0 if a is None else a, dtype=torch.float64, device=device)
    try:
        return torch.broadcast_to(tt, shape)
    except RuntimeError:
        raise ValueError(f"alpha of shape {tuple(tt.shape)} does not fit {shape}") from None


def top_k(k, vocab_size: int) -> int | None:
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab_size:
        raise ValueError(f"top_k must be None or an int in [1, {vocab_size}] (the vocabulary), got {k!r}")
    return k


def _fraction(name: str, p) -> float | None:
    """None, or ``p`` as a float in (0, 1]; else a ValueError naming ``name``."""
    if p is None:
        return None
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1) or math.isnan(p):
        raise ValueError(f"{name} must be None or a number in (0, 1], got {p!r}")
    return float(p)


def min_p(p) -> float | None:
    return _fraction("min_p", p)


def top_p(p) -> float | None:
    return _fraction("top_p", p)


def per_row(name: str, v, rows: int, device, *, non_negative: bool = False,
            span: int = 0) -> torch.Tensor:
    """An int or an integer tensor ``[rows]`` -> int64 ``[rows]``; ``span``: the values are
    positions and ``value + span`` must stay an int64 (a block past the first position)."""
    if v is None:
        v = 0
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an int or an int64 tensor of shape [{rows}], got a bool")
    if isinstance(v, int):
        if not INT64_MIN <= v <= INT64_MAX:
            raise ValueError(f"{name} must be an int in [-2**63, 2**63) (an int64 counter), got "
                             f"{v}")
        out = torch.full((rows,), v, dtype=torch.int64, device=device)
    elif isinstance(v, torch.Tensor):
        if v.is_floating_point() or v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {v.dtype}")
        if tuple(v.shape) != (rows,):
            raise ValueError(f"{name} must have shape [{rows}] (one per row), got {tuple(v.shape)}")
        out = v.to(device=device, dtype=torch.int64)
    else:
        raise ValueError(f"{name} must be an int or an int64 tensor of shape [{rows}], got {type(v).__name__}")
    if non_negative and bool((out < 0).any()):
        raise ValueError(f"{name} must be >= 0, got {out.min().item()}")
    if span and bool((out > INT64_MAX - span).any()):
        raise ValueError(f"{name} must be at most 2**63 - 1 - {span} here (the block's last "
                         f"position is {name} + {span}, an int64), got {out.max().item()}")
    return out


def int_tensor(name: str, x, dims: int) -> torch.Tensor:
    """An integer (int64) tensor with ``dims`` dimensions, else a ValueError naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be an int64 tensor, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor (int64), got {x.dtype}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(x.shape)}")
    return x


def divergence_budget(b, rows: int | None = None, device=None) -> torch.Tensor | None:
    """None (no budget), or a float64 tensor ``[rows]`` (``()`` when ``rows`` is None) from a
    number or ``rows`` numbers, each >= 0 (``inf``: unlimited). A divergence budget is a total
    variation distance: 0 is lossless, 1 or more allows any law."""
    if b is None:
        return None
    shape = () if rows is None else (rows,)
    if isinstance(b, bool) or not isinstance(b, (int, float, torch.Tensor, list, tuple)):
        raise ValueError(f"divergence_budget must be None, a number >= 0 or {rows or 'B'} such "
                         f"numbers, got {type(b).__name__}")
    try:
        tt = torch.as_tensor(b, dtype=torch.float64, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"divergence_budget must be None, a number >= 0 or {rows or 'B'} such "
                         f"numbers, got {b!r}") from None
    if bool(torch.isnan(tt).any()) or bool((tt < 0).any()):
        raise ValueError(f"divergence_budget must be >= 0 (inf: unlimited), got {b!r}")
    if tt.dim() > 1 or (tt.dim() == 1 and tuple(tt.shape) != shape):
        allowed = "a number" if rows is None else f"a number or {rows} numbers (one per row)"
        raise ValueError(f"divergence_budget must be {allowed}, got shape {tuple(tt.shape)}")
    return torch.broadcast_to(tt, shape).clone()
