"""How the drafter draws its tokens: exactly from ``qT`` (docs/semantics.md §1), with the DRAFT
stream. :func:`sample` checks its inputs; :func:`draw` (the engine's entry, inputs already
checked) hands them to the dispatch, :func:`speccascade_fast.backends.sample`."""
from __future__ import annotations

import torch

from . import backends, checks


def sample(logits, *, temperature=1.0, top_k=None, top_p=None, seed=0, positions=None,
           backend="auto", min_p=None) -> torch.Tensor:
    """Draw one token per row from ``qT`` = the scaled, truncated softmax of ``logits``.

    Args:
        logits: ``[B, V]`` or ``[B, n, V]`` (fp32/bf16/fp16/fp64; -inf masks a token).
        temperature: T >= 0 (0 = argmax, ties to the lowest id); a number or a tensor ``[B]``.
        top_k, top_p: optional truncation, as in :func:`speccascade_fast.verify`.
        min_p: None, or keep only the tokens whose probability (after top-k / top-p) is at
            least ``min_p`` (in (0, 1]) times the largest: Hugging Face's ``min_p``.
        seed: int or int64 tensor ``[B]``.
        positions: int64 tensor ``[B]``: absolute position of the token drawn from row b (for
            ``[B, n, V]``, of the first of its n tokens; the k-th uses ``positions + k``).
        backend: ``"auto"`` uses the compiled CPU kernel (``_C.sample_cpu``) for CPU fp32/bf16/
            fp16 logits and the Triton kernels (:mod:`speccascade_fast.kernels.sample`) for CUDA
            ones when triton imports (both with top-k / top-p as keep bounds,
            :mod:`speccascade_fast.truncation`), else the torch reference; ``"reference"``
            forces the latter, ``"triton"`` the Triton kernels (fp32/bf16/fp16 logits; on the
            CPU only under ``TRITON_INTERPRET=1``). All draw the same tokens up to
            floating-point near-ties.

    Returns:
        int64 ``[B]`` (or ``[B, n]``). The draw is the exponential race
        ``argmax_v log qT(v) - log(-log u_v)`` with ``u_v`` from the counter-based RNG keyed by
        ``(seed, position, DRAFT, v)``: a row's token depends only on its own inputs.

    Example:
        >>> sample(torch.randn(4, 32), temperature=0.7, seed=3, positions=torch.arange(4))
        tensor([...])
    """
    checks.logits("logits", logits)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must have shape [B, V] or [B, n, V], got {tuple(logits.shape)}")
    B, V = logits.shape[0], logits.shape[-1]
    device = logits.device
    seed = checks.per_row("seed", seed, B, device)
    positions = checks.per_row("positions", positions, B, device, non_negative=True,
                               span=logits.shape[1] if logits.dim() == 3 else 0)
    temperature = checks.temperature(temperature, (B,), device)
    top_k, top_p, min_p = checks.top_k(top_k, V), checks.top_p(top_p), checks.min_p(min_p)
    _check_backend(backend, logits)
    if logits.dim() == 3:  # row b's k-th token sits at position positions[b] + k
        n = logits.shape[1]
        pos = (positions[:, None] + torch.arange(n, device=device)).reshape(-1)
        flat = draw(logits.reshape(B * n, V), temperature.repeat_interleave(n),
                    seed.repeat_interleave(n), pos, top_k, top_p, backend=backend, min_p=min_p)
        return flat.view(B, n)
    return draw(logits, temperature, seed, positions, top_k, top_p, backend=backend,
                min_p=min_p)


def _check_backend(backend, logits) -> None:
    """``backend``: "auto" or a backend that samples on the logits' device (as ``verify``
    takes them), else a ValueError naming those that do."""
    if backend == "auto":
        return
    if backend == "triton" and "triton" not in backends.available(logits.device, "sample"):
        raise ValueError(f"backend='triton' is not available for {logits.device} logits "
                         "(it needs triton and a GPU, or TRITON_INTERPRET=1 on the CPU)")
    backends.resolve(backend, logits.device, "sample")  # a ValueError naming the available ones
    if backend != "reference" and logits.dtype not in backends.FUSED_DTYPES:
        raise ValueError(f"backend={backend!r} samples float32, bfloat16 or float16 logits, got "
                         f"{logits.dtype} (backend='reference' takes float64)")


def draw(logits, temperature, seed, positions, top_k=None, top_p=None, *, greedy=None,
         backend="auto", min_p=None) -> torch.Tensor:
    """:func:`sample` on ``[R, V]`` logits with inputs already checked: float64 ``temperature``,
    int64 ``seed`` and ``positions`` ``[R]`` on the logits' device, ``top_k`` / ``top_p`` /
    ``min_p`` normalised. No host synchronisation on CUDA (the top-k / top-p keep bounds come
    from torch's top-k and the Triton search there, min-p's from one max per row) unless
    ``greedy`` is None on the torch path (whether every row is greedy is then read from
    ``temperature``): the engine's CUDA graphs call it with ``greedy`` known. On CUDA the
    Triton kernels take every call that is not known to be all greedy (an all-greedy call is
    one argmax), for fp32/bf16/fp16 logits when triton imports; on the CPU the compiled kernel
    takes fp32/bf16/fp16 logits (``backend="auto"``). The choice is
    :func:`speccascade_fast.backends.resolve`'s."""
    return backends.sample(backend, logits, temperature, seed, positions, top_k, top_p,
                           greedy=greedy, min_p=min_p)


def draft_probability(logits, tokens, temperature) -> torch.Tensor:
    """float64 ``[R]``: the probability ``softmax(logits[r] / T_r)[tokens[r]]`` the drafter gave
    each draft, with ``T_r = 1`` where the row is greedy (``T_r = 0``: a greedy draft's
    probability at T = 1, as Hugging Face's ``assistant_confidence_threshold`` reads it), before
    any top-k / top-p truncation. ``logits`` ``[R, V]``, ``tokens`` int64 ``[R]``,
    ``temperature`` a number or float tensor ``[R]``.

    Computed in float64 row by row, so a row's value does not depend on the other rows: the
    batched and the sequential engine stop drafting at the same draft
    (:func:`speccascade_fast.generate`'s ``draft_confidence``)."""
    t = _greedy_at_one(temperature, logits, torch.float64)
    logp = torch.log_softmax(logits.double() / t[:, None], dim=-1)
    return logp.gather(1, tokens.view(-1, 1)).squeeze(1).exp()


def max_probability(logits, temperature) -> torch.Tensor:
    """float32 ``[R, S]``: the largest probability of ``softmax(logits[r, s] / T_r)`` (the Chow
    score), with ``T_r = 1`` where the row is greedy as in :func:`draft_probability`.
    ``logits`` ``[R, S, V]``, ``temperature`` a number or float tensor ``[R]``. It feeds the
    goodput controller's acceptance prediction only, never a draw."""
    t = _greedy_at_one(temperature, logits, torch.float32)[:, None, None]
    # a float32 copy, scaled in place (never the caller's logits)
    return torch.softmax(logits.to(torch.float32, copy=True).div_(t), dim=-1).amax(-1)


def _greedy_at_one(temperature, logits, dtype) -> torch.Tensor:
    """Each row's temperature as a ``[R]`` tensor of ``dtype`` on the logits' device, 1 where
    the row is greedy (the drafter's probabilities of a greedy row are read at T = 1)."""
    t = torch.as_tensor(temperature, dtype=dtype, device=logits.device)
    return torch.where(t > 0, t, torch.ones_like(t)).expand(logits.shape[0])
