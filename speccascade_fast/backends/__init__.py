"""The backends, and the one place that chooses among them.

Import direction: the public API (:mod:`speccascade_fast.verify`, :mod:`speccascade_fast.ragged`,
:mod:`speccascade_fast.sampling`) calls the dispatch below; the dispatch calls the backend modules
(:mod:`.reference`, :mod:`.cpu`, :mod:`.cuda`, :mod:`.triton`); the backends call their kernels
(the torch ops of ``speccascade_fast._C`` through :mod:`._ops`, the Triton kernels of
:mod:`speccascade_fast.kernels`). No module imports one above it.

**Registry.** :data:`REGISTRY` says, per backend, which kinds of work (:data:`KINDS`) it
implements; each backend module says where it is available (``is_available(device)``) and
:func:`covers` which calls its kernels take (the others go to the reference backend):

============  ========================  ===================  =====================================
backend       verify, verify_ragged     sample               keep_bounds
============  ========================  ===================  =====================================
triton        any float logits (fp64    fp32/bf16/fp16, not  fp32/bf16/fp16 with top-p (top-k
              rounded to fp32)          all rows greedy      alone: one torch top-k); "auto": CUDA
                                        ("auto": CUDA only)  only
cuda          fp32/bf16/fp16            -                    -
cpu           fp32/bf16/fp16            fp32/bf16/fp16       fp32/bf16/fp16
reference     everything                everything           everything
============  ========================  ===================  =====================================

The rule ``ensemble`` (Hugging Face's ``assistant_ensemble_weight``) has no fused kernel: its
verifications go to the reference on every backend (:func:`covers` with ``rule``).

:func:`resolve` is the one function that picks: ``"auto"`` is the first backend of
:data:`PREFERENCE` that is available for the kind on the device and covers the call; an explicit
name must be available, and a call it does not cover goes to the reference. ("auto" takes
Triton's CPU interpreter, when ``TRITON_INTERPRET=1`` makes it available, for verification only:
sampling and keep bounds on the CPU stay on the compiled op or torch.)

**Dispatch.** :func:`verify` / :func:`get`, :func:`verify_ragged`, :func:`sample` and
:func:`keep_bounds` (with :func:`keep_bounds_or_none`, :func:`keep_bounds_pair`,
:func:`ragged_keep_bounds`) run a call of each kind on the backend chosen; the fused
verifications receive the top-k / top-p keep bounds (:mod:`speccascade_fast.truncation`) computed
here, by the keep-bound implementation :func:`resolve` picks for the logits. Inputs arrive
validated and normalised by the public API (or the engine, which validated them once).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from types import ModuleType
from typing import NamedTuple

import torch

from ..layout import row_temperatures
from ..rules import REFERENCE_ONLY_RULES
from ..truncation import rows, with_min_p
from ..types import VerifyOutput
from . import cpu, cuda, reference, triton

__all__ = [
    "FUSED_DTYPES", "KINDS", "PREFERENCE", "REGISTRY", "Backend", "available", "covers", "get",
    "keep_bounds", "keep_bounds_or_none", "keep_bounds_pair", "ragged_keep_bounds", "resolve",
    "sample", "verify", "verify_ragged",
]

#: the kinds of work a backend may implement
KINDS = ("verify", "verify_ragged", "sample", "keep_bounds")
#: the order in which "auto" tries the backends, fastest first
PREFERENCE = ("triton", "cuda", "cpu", "reference")
#: logits dtypes the fused kernels read (float64 calls go to the reference, but the triton
#: backend's verification, which rounds them to float32)
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Backend(NamedTuple):
    """One backend: its module, the kinds of work it implements, and, per kind, the device
    types on which "auto" may pick it (a kind not listed: wherever it is available)."""

    module: ModuleType
    kinds: frozenset[str]
    auto_devices: Mapping[str, tuple[str, ...]] = {}
    #: whether its ``verify`` takes a divergence budget (else such calls go to the reference)
    budget: bool = False


REGISTRY: dict[str, Backend] = {
    "triton": Backend(triton, frozenset(KINDS), {"sample": ("cuda",), "keep_bounds": ("cuda",)},
                      budget=True),
    "cuda": Backend(cuda, frozenset({"verify", "verify_ragged"}), budget=True),
    "cpu": Backend(cpu, frozenset(KINDS), budget=True),
    "reference": Backend(reference, frozenset(KINDS), budget=True),
}


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def available(device=None, kind: str = "verify") -> tuple[str, ...]:
    """Backends that implement ``kind`` and run on ``device`` (a torch.device, a string, or None
    for the CPU), in :data:`PREFERENCE` order."""
    return tuple(name for name in PREFERENCE
                 if kind in REGISTRY[name].kinds and REGISTRY[name].module.is_available(device))


def covers(name: str, kind: str, *logits: torch.Tensor, greedy: bool | None = None,
           top_p: float | None = None, rule: str | None = None) -> bool:
    """Whether backend ``name``'s kernels take a call of ``kind`` on ``logits`` (the module
    docstring's table): ``greedy`` whether every row is known to be greedy (``sample``),
    ``top_p`` the call's top-p (``keep_bounds``), ``rule`` the verification's rule (the rules of
    :data:`speccascade_fast.rules.REFERENCE_ONLY_RULES`, ``ensemble``, have no fused kernel:
    only the reference covers them). With no logits: whether it covers some call."""
    if name == "reference":
        return True
    if rule in REFERENCE_ONLY_RULES:
        return False
    fused = all(t.dtype in FUSED_DTYPES for t in logits)
    if name == "triton":
        if kind in ("verify", "verify_ragged"):
            return True
        if kind == "sample":  # an all-greedy draw is one argmax
            return fused and not greedy
        return fused and top_p is not None  # keep_bounds: top-k alone is one torch top-k
    return fused


def resolve(name: str, device=None, kind: str = "verify", *, logits: tuple = (),
            greedy: bool | None = None, top_p: float | None = None) -> str:
    """The backend that runs a call of ``kind`` on ``device``: ``name`` if it is available there
    (else a ValueError naming the available ones), or for ``"auto"`` the first of
    :data:`PREFERENCE` that is, "auto" may pick there, and covers the call (``logits``,
    ``greedy``, ``top_p``: as in :func:`covers`); a call that the backend does not cover goes to
    the reference."""
    names = available(device, kind)
    if name == "auto":
        dev = _device(device).type
        names = tuple(n for n in names if dev in REGISTRY[n].auto_devices.get(kind, (dev,)))
    elif name in names:
        names = (name,)
    else:
        raise ValueError(
            f"backend={name!r} is not available here; choose 'auto' or one of {', '.join(names)}"
        )
    for n in names:
        if covers(n, kind, *logits, greedy=greedy, top_p=top_p):
            return n
    return "reference"


# ---- verification -----------------------------------------------------------------------------
def get(name: str, device=None):
    """A ``verify`` function with the reference backend's signature running on backend ``name``
    (``"auto"``: the fastest for ``device``), resolved once: :func:`verify` with its name bound."""
    return functools.partial(verify, resolve(name, device))


def verify(name, draft_logits, draft_tokens, target_logits, *, rule, alpha, temperature, top_k,
           top_p, seed, positions, budget=None) -> VerifyOutput:
    """:func:`speccascade_fast.verify` on backend ``name`` (resolved, not ``"auto"``; a call it
    does not cover goes to the reference) with inputs validated and normalised there.
    ``budget``: None or float64 ``[B]``, the divergence budget each row has left (a backend
    whose registry entry has no ``budget`` leaves such calls to the reference)."""
    if not covers(name, "verify", draft_logits, target_logits, rule=rule) or (
            budget is not None and not REGISTRY[name].budget):
        name = "reference"
    extra = {} if budget is None else {"budget": budget}
    if name == "reference":
        return reference.verify(draft_logits, draft_tokens, target_logits, rule=rule,
                                alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, positions=positions, **extra)
    T = temperature[:, None]
    keep = keep_bounds_pair(draft_logits, T, target_logits, T, top_k, top_p)
    return REGISTRY[name].module.verify(
        draft_logits, draft_tokens, target_logits, rule=rule, alpha=alpha,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, positions=positions,
        keep=keep, **extra)


def verify_ragged(name, draft_logits, draft_tokens, target_logits, cu, bonus_draft_logits, *,
                  max_gamma=None, max_spec_len=None, rule, alpha, temperature, top_k, top_p,
                  seed, positions) -> VerifyOutput:
    """:func:`speccascade_fast.verify_ragged` on backend ``name`` (resolved, not ``"auto"``; a
    call it does not cover goes to the reference) without its checks: the inputs are valid and
    normalised (``alpha`` / ``temperature`` float64, ``seed`` / ``positions`` int64, all ``[B]``
    on the logits' device; ``top_k`` / ``top_p`` as the checks return them). ``max_gamma``: the
    longest request's gamma if known (else read from ``cu``).

    With ``max_spec_len`` on ``cuda`` or ``triton`` nothing is read on the host (top-k /
    top-p included: on CUDA the keep bounds come from the Triton search, or one full sort per row
    without triton), so a CUDA graph can capture the call and replay it with other values of
    ``cu`` (the engine's blocks cut by ``draft_confidence``)."""
    more = (bonus_draft_logits,) if bonus_draft_logits is not None else ()
    if not covers(name, "verify_ragged", draft_logits, target_logits, *more, rule=rule):
        name = "reference"
    args = dict(rule=rule, alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p,
                seed=seed, positions=positions)
    if name in ("cpu", "cuda"):  # one fused op call (C++ / CUDA C++) over the flattened rows
        keep = ragged_keep_bounds(draft_logits, target_logits, bonus_draft_logits, cu,
                                  temperature, top_k, top_p)
        return REGISTRY[name].module.verify_ragged(
            draft_logits, draft_tokens, target_logits, cu, bonus_draft_logits, **args,
            max_spec_len=max_spec_len, keep=keep)
    if max_spec_len is not None:
        max_gamma = max_spec_len
    if name == "triton":
        if max_gamma is None:
            max_gamma = int((cu[1:] - cu[:-1]).max())
        keep = ragged_keep_bounds(draft_logits, target_logits, bonus_draft_logits, cu,
                                  temperature, top_k, top_p)
        return triton.verify_ragged(draft_logits, draft_tokens, target_logits, cu,
                                    bonus_draft_logits, max_gamma=max_gamma, **args, keep=keep)
    return reference.verify_ragged(draft_logits, draft_tokens, target_logits, cu,
                                   bonus_draft_logits, max_gamma=max_gamma, **args)


# ---- the drafter's draw -----------------------------------------------------------------------
def sample(name, logits, temperature, seed, positions, top_k=None, top_p=None, *,
           greedy=None, min_p=None) -> torch.Tensor:
    """The drafter's draw (:func:`speccascade_fast.sampling.draw`) on backend ``name`` (or
    ``"auto"``), inputs checked: ``logits`` ``[R, V]``, float64 ``temperature``, int64 ``seed``
    and ``positions`` ``[R]``, ``top_k`` / ``top_p`` / ``min_p`` normalised; ``greedy`` whether
    every row has T = 0, if known (None: the reference path reads it from ``temperature``)."""
    name = resolve(name, logits.device, "sample", logits=(logits,), greedy=greedy)
    if name == "reference":
        return reference.sample(logits, temperature, seed, positions, top_k, top_p,
                                greedy=greedy, min_p=min_p)
    keep = with_min_p(keep_bounds_or_none(logits, temperature, top_k, top_p), logits,
                      temperature, min_p)
    return REGISTRY[name].module.sample(logits, temperature, seed, positions, keep)


# ---- top-k / top-p keep bounds ----------------------------------------------------------------
def keep_bounds(logits: torch.Tensor, temperature, top_k: int | None,
                top_p: float | None) -> torch.Tensor:
    """The keep bounds of every row (:mod:`speccascade_fast.truncation`): float64 ``[..., 2]``
    = ``(tau, cut)`` of ``logits`` ``[..., V]`` (any float dtype) with ``temperature``
    broadcastable to ``logits.shape[:-1]`` (rows with T = 0 keep everything), by the
    implementation :func:`resolve` picks: the C++ op for CPU fp32/fp16/bf16 logits, the Triton
    search for top-p of CUDA ones (with triton), else torch."""
    name = resolve("auto", logits.device, "keep_bounds", logits=(logits,), top_p=top_p)
    if name == "reference":
        return reference.keep_bounds(logits, temperature, top_k, top_p)
    out = REGISTRY[name].module.keep_bounds(*rows(logits, temperature), top_k, top_p)
    return out.reshape(*logits.shape[:-1], 2)


def keep_bounds_or_none(logits: torch.Tensor, temperature, top_k: int | None,
                        top_p: float | None) -> torch.Tensor | None:
    """:func:`keep_bounds` (contiguous), or ``None`` when neither truncation is asked for: the
    optional ``keep`` argument of the fused kernels."""
    if top_k is None and top_p is None:
        return None
    return keep_bounds(logits, temperature, top_k, top_p)


def keep_bounds_pair(a: torch.Tensor, ta, b: torch.Tensor, tb, top_k: int | None,
                     top_p: float | None):
    """:func:`keep_bounds_or_none` of two logit tensors (a verification's draft and target
    rows, each with its temperatures): ``(bounds of a, bounds of b)``, or two ``None``. Where the
    Triton search runs (CUDA, top-p) one search covers both when they share dtype and
    vocabulary: the launches of one."""
    if top_k is None and top_p is None:
        return None, None
    V = a.shape[-1]
    searched = resolve("auto", a.device, "keep_bounds", logits=(a,), top_p=top_p) == "triton"
    if not (searched and b.dtype == a.dtype and b.shape[-1] == V and b.device == a.device):
        return keep_bounds(a, ta, top_k, top_p), keep_bounds(b, tb, top_k, top_p)
    out = triton.keep_bounds(*rows(a, ta), top_k, top_p, second=rows(b, tb))
    n = a.numel() // V
    return out[:n].reshape(*a.shape[:-1], 2), out[n:].reshape(*b.shape[:-1], 2)


def ragged_keep_bounds(draft_logits, target_logits, bonus_draft_logits, cu_num_draft_tokens,
                       temperature, top_k, top_p):
    """The keep bounds of vLLM's flattened layout (:mod:`speccascade_fast.layout`), each row
    with its request's T: ``(draft [N, 2], target [N + B, 2], bonus [B, 2] or None)``, or
    three ``None`` when neither truncation is asked for. No host read. Padding rows (after
    ``cu[B]`` drafts, ``cu[B] + B`` targets) get the last request's T: never read."""
    if top_k is None and top_p is None:
        return None, None, None
    t_draft, t_target = row_temperatures(cu_num_draft_tokens, temperature,
                                         draft_logits.shape[0], target_logits.shape[0])
    kb = (None if bonus_draft_logits is None
          else keep_bounds(bonus_draft_logits, temperature, top_k, top_p))
    kd, kt = keep_bounds_pair(draft_logits, t_draft, target_logits, t_target, top_k, top_p)
    return kd, kt, kb
