"""The per-call inputs of ``generate``, parsed and validated once for both decoding loops: prompts
(padding removed), seeds, EOS and pad ids, token budgets, per-sequence temperature and alpha.
Each function raises a ``ValueError`` naming its argument and the allowed values."""
from __future__ import annotations

import torch

from . import checks, model_facts
from .config import DEFAULT_ALPHA
from .rules import ALPHA_RANGES, check_alpha, check_rule


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def prompts(input_ids, attention_mask) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The unpadded 1-D prompts and ``input_ids`` as a 2-D integer tensor ``[B, P]``."""
    if not isinstance(input_ids, torch.Tensor):
        try:
            input_ids = torch.tensor(input_ids, dtype=torch.int64)
        except (TypeError, ValueError):
            raise ValueError("input_ids must be an int64 tensor [B, P] (or a list of equal-"
                             "length lists)") from None
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor [B, P], got {input_ids.dtype} "
                         f"of shape {tuple(input_ids.shape)}")
    if input_ids.device.type == "meta":
        raise ValueError("input_ids is a meta tensor (no data); pass token ids on a real device")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): a prompt needs at "
                         "least one token")
    if attention_mask is None:
        return list(input_ids), input_ids
    attention_mask = torch.as_tensor(attention_mask)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal "
                         f"input_ids shape {tuple(input_ids.shape)}")
    if attention_mask.device.type == "meta":
        raise ValueError("attention_mask is a meta tensor (no data)")
    keep = attention_mask.to(input_ids.device).bool()
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold 0 (padding) and 1 (prompt) only")
    # a row's prompt is one run of 1s (left or right padding): a 0 between 1s would drop a token
    runs = (keep[:, 1:] & ~keep[:, :-1]).sum(1) + keep[:, 0].long()
    bad = (runs > 1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"attention_mask row {bad[0]} has a 0 between 1s; padding goes before "
                         f"or after the prompt, not inside it")
    rows = [row[k] for row, k in zip(input_ids, keep)]
    if any(p.numel() == 0 for p in rows):
        raise ValueError("input_ids has an empty prompt (a row whose attention_mask is all 0)")
    return rows, input_ids


def seeds(seed, B: int) -> list[int]:
    """One seed per sequence: ``seed + b`` from an int, else the B ints given."""
    if isinstance(seed, bool):
        raise ValueError("seed must be an int or a list/tensor of B ints, got a bool")
    if isinstance(seed, int):
        if not checks.INT64_MIN <= seed <= checks.INT64_MAX - (B - 1):
            raise ValueError(f"seed must be an int in [-2**63, 2**63 - {B}] (sequence b uses "
                             f"seed + b, an int64), got {seed}")
        return [seed + b for b in range(B)]
    if isinstance(seed, torch.Tensor):
        if seed.is_floating_point() or seed.dim() != 1:
            raise ValueError(f"seed tensor must be 1-D integer [B], got {seed.dtype} "
                             f"{tuple(seed.shape)}")
        seed = seed.tolist()
    if isinstance(seed, (list, tuple)) and len(seed) == B and all(map(_is_int, seed)):
        bad = [s for s in seed if not checks.INT64_MIN <= s <= checks.INT64_MAX]
        if bad:
            raise ValueError(f"seed values must be ints in [-2**63, 2**63) (int64), got {bad[0]}")
        return list(seed)
    raise ValueError(f"seed must be an int or a list/tensor of {B} ints (one per sequence)")


def eos_ids(eos_token_id, *models) -> frozenset[int]:
    """The EOS ids: ``eos_token_id`` (an int or ints), or None: the first of ``models`` whose
    generation config names one (no early stop if none does)."""
    if eos_token_id is None:
        for m in models:
            gc = getattr(m, "generation_config", None)
            if gc is not None and gc.eos_token_id is not None:
                eos_token_id = gc.eos_token_id
                break
        else:
            return frozenset()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    if _is_int(eos_token_id):
        return frozenset([eos_token_id])
    if isinstance(eos_token_id, (list, tuple, set, frozenset)) and all(map(_is_int, eos_token_id)):
        return frozenset(eos_token_id)
    raise ValueError(f"eos_token_id must be None, an int or a list of ints, got {eos_token_id!r}")


def check_vocab(prompts: list[torch.Tensor], eos, pad: int, vocab: int) -> None:
    """Prompt tokens, EOS ids and the pad id must be token ids of the models' vocabulary."""
    for b, p in enumerate(prompts):
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= vocab):
            bad = int(p.min()) if int(p.min()) < 0 else int(p.max())
            raise ValueError(f"input_ids row {b} holds token {bad}, outside the vocabulary "
                             f"[0, {vocab})")
    for e in eos:
        if not 0 <= e < vocab:
            raise ValueError(f"eos_token_id {e} is outside the vocabulary [0, {vocab})")
    if not 0 <= pad < vocab:
        raise ValueError(f"pad_token_id {pad} is outside the vocabulary [0, {vocab})")


def pad_id(pad_token_id, model, eos) -> int:
    """``pad_token_id``, or the model's generation config's, else the smallest EOS id, else 0."""
    if pad_token_id is not None:
        return int(pad_token_id)
    gc = getattr(model, "generation_config", None)
    if gc is not None and gc.pad_token_id is not None:
        pad = gc.pad_token_id
        return int(pad[0] if isinstance(pad, (list, tuple)) else pad)
    return min(eos) if eos else 0


def budgets(max_new_tokens, B: int, *, per_sequence: bool = True) -> list[int]:
    """``max_new_tokens`` as B ints >= 1: an int, or (``per_sequence``) B ints."""
    n = max_new_tokens
    if per_sequence and isinstance(n, torch.Tensor):
        n = n.tolist()
    values = n if per_sequence and isinstance(n, (list, tuple)) else [n] * B
    if len(values) != B or any(not _is_int(v) or v < 1 for v in values):
        allowed = f"an int >= 1 or {B} such ints (one per sequence)" if per_sequence \
            else "an int >= 1"
        raise ValueError(f"max_new_tokens must be {allowed}, got {max_new_tokens!r}")
    return list(values)


def check_context(models, prompts: list[torch.Tensor], max_new_tokens: int) -> None:
    """The longest prompt plus ``max_new_tokens`` must fit each model's context (an
    encoder-decoder's decoder starts from one token)."""
    longest = max(p.numel() for p in prompts)
    for name, m in models:
        if m is None:
            continue
        n = 1 if model_facts.is_encoder_decoder(m) else longest
        limit = model_facts.context(m)
        if limit is not None and n + max_new_tokens > limit:
            raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"{name}'s context of {limit} tokens (max_position_embeddings)")


def per_sequence(name: str, value, default, B: int, rule: str | None,
                 device) -> torch.Tensor | None:
    """``temperature`` or ``alpha`` as float64 ``[B]`` on ``device`` from None (``default``),
    a number, or B numbers; None for alpha when the rule takes none."""
    if name == "alpha" and rule is None:
        return None
    value = default if value is None else value
    if value is None:  # a rule without alpha
        return None
    if isinstance(value, (list, tuple)):
        value = torch.tensor(value, dtype=torch.float64)
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise ValueError(f"{name} must be a number or a list/tensor of {B} numbers")
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() > 1 or (t.dim() == 1 and t.numel() != B):
        raise ValueError(f"{name} must be a number or {B} numbers (one per sequence), got "
                         f"shape {tuple(t.shape)}")
    if name == "alpha":
        check_alpha(rule, t)
    else:
        t = checks.temperature(t, tuple(t.shape))
    return t.expand(B).clone().to(device)


def per_sequence_rules(rule, alpha, exact_prefix, cfg, B: int, device):
    """Each sequence's rule, alpha and exact prefix for a ``spec_cascade`` batch: ``rule`` None
    (the config's), a rule name, or B names; ``alpha`` None (the config's alpha for the config's
    rule, else each rule's default), a number or B numbers, each checked against its row's rule
    (rules without alpha ignore it); ``exact_prefix`` None (the config's), an int >= 0 or B such
    ints. Returns ``(rules, alpha float64 [B] on device, exact_prefix)``."""
    if isinstance(rule, str) or rule is None:
        rules = [cfg.rule if rule is None else rule] * B
    elif isinstance(rule, (list, tuple)) and len(rule) == B:
        rules = list(rule)
    else:
        raise ValueError(f"rule must be None, a rule name or {B} rule names (one per sequence), "
                         f"got {rule!r}")
    for r in rules:
        check_rule(r)
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.tolist()
    if isinstance(alpha, (list, tuple)):
        if len(alpha) != B:
            raise ValueError(f"alpha must be a number or {B} numbers (one per sequence), got "
                             f"{len(alpha)}")
        values = list(alpha)
    else:
        values = [alpha] * B
    out = []
    for b, (r, a) in enumerate(zip(rules, values)):
        if a is None:
            a = cfg.alpha if r == cfg.rule else DEFAULT_ALPHA[r]
        if ALPHA_RANGES[r] is None:
            out.append(0.0)  # a rule without alpha: the backends read zeros
            continue
        if isinstance(a, bool) or not isinstance(a, (int, float)):
            raise ValueError(f"alpha of sequence {b} must be a number, got {a!r}")
        check_alpha(r, a)
        out.append(float(a))
    exact = cfg.exact_prefix if exact_prefix is None else exact_prefix
    exact = list(exact) if isinstance(exact, (list, tuple)) else [exact] * B
    if len(exact) != B or any(not _is_int(e) or e < 0 for e in exact):
        raise ValueError(f"exact_prefix must be an int >= 0 or {B} such ints (one per sequence), "
                         f"got {exact_prefix!r}")
    return rules, torch.tensor(out, dtype=torch.float64, device=device), exact


def divergence_budgets(budget, default: float | None, B: int) -> list[float] | None:
    """Each sequence's divergence budget for a ``spec_cascade`` batch: ``budget`` None (the
    config's ``default``), a number >= 0 or B numbers (``inf``: no limit for that sequence, its
    spending still measured). None when neither the call nor the config sets one."""
    if budget is None:
        budget = default
    if budget is None:
        return None
    if isinstance(budget, torch.Tensor):
        budget = budget.tolist()
    return checks.divergence_budget(budget, B).tolist()
