"""What a sequence emits and what ``generate`` returns, shared by both decoding loops: the emit rule
(tokens up to the first EOS and the budget), whether a bonus token can still be emitted, the
HF-style ``sequences`` tensor and the final statistics."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .stats import Counters


@dataclass
class GenerateOutput:
    """``sequences``: int64 ``[B, L]``, HF style: for decoder-only models the prompt as given
    (with its padding) followed by the new tokens, right-padded with ``pad_token_id`` after EOS;
    for encoder-decoder models the decoder sequences (``decoder_start_token_id`` first).
    ``stats``: the counters and rates of :mod:`speccascade_fast.stats`, plus the settings used.
    ``new_tokens``: the new tokens of each sequence, unpadded."""

    sequences: torch.Tensor
    stats: dict
    new_tokens: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class Hooks:
    """Callbacks of one ``generate`` call, called by both decoding loops.

    ``on_tokens(b, tokens)``: sequence b emitted ``tokens`` (after each verification block or
    step, in order: exactly the tokens its output gains). ``stop(b, new_tokens) -> bool``: asked
    after each emitted token with all of sequence b's new tokens so far; True ends the sequence
    at that token (as an EOS would)."""

    on_tokens: Callable[[int, list[int]], None] | None = None
    stop: Callable[[int, list[int]], bool] | None = None

    def __post_init__(self):
        for name in ("on_tokens", "stop"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be None or a callable, got {type(value).__name__}")

    def emit(self, b: int, new_tokens: list[int], tokens: list[int], remaining: int,
             eos) -> tuple[list[int], bool]:
        """Sequence b, whose new tokens so far are ``new_tokens``, emits ``tokens`` by the emit
        rule; ``new_tokens`` is extended in place and ``on_tokens`` told. Returns ``(kept,
        done)``."""
        stop = None if self.stop is None else (lambda kept: self.stop(b, [*new_tokens, *kept]))
        kept, done = emit(tokens, remaining, eos, stop)
        new_tokens.extend(kept)
        if kept and self.on_tokens is not None:
            self.on_tokens(b, kept)
        return kept, done


NO_HOOKS = Hooks()


def emit(tokens: list[int], remaining: int, eos, stop=None) -> tuple[list[int], bool]:
    """The emit rule: of ``tokens``, a sequence with ``remaining`` tokens of budget keeps those up
    to its first EOS id (included), the first token after which ``stop(kept)`` is True, and its
    budget. Returns ``(kept, done)``."""
    kept = []
    for x in tokens[:remaining]:
        kept.append(x)
        if x in eos or (stop is not None and stop(kept)):
            return kept, True
    return kept, remaining - len(kept) <= 0


def bonus_keepable(drafts: list[int], remaining: int, eos) -> bool:
    """Whether a bonus token after these drafts could be emitted by a sequence with
    ``remaining`` tokens of budget and EOS ids ``eos``: the budget has room for it and the last
    draft is not EOS. (Otherwise the verifier's bonus stands in: it decides a token that is cut
    anyway, so no bonus drafter step is run for it.)"""
    return len(drafts) < remaining and drafts[-1] not in eos


def sequences(input_ids: torch.Tensor, new_tokens: list[list[int]], pad: int,
              decoder_outputs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """HF-style ``sequences``: prompts as given + new tokens, right-padded with ``pad``; for
    encoder-decoder models (``decoder_outputs``) the decoder sequences, right-padded."""
    device = input_ids.device
    if decoder_outputs is not None:
        L = max(o.numel() for o in decoder_outputs)
        out = torch.full((len(decoder_outputs), L), pad, dtype=torch.int64, device=device)
        for b, o in enumerate(decoder_outputs):
            out[b, : o.numel()] = o
        return out
    width = max(len(n) for n in new_tokens)
    new = torch.full((input_ids.shape[0], width), pad, dtype=torch.int64, device=device)
    for b, n in enumerate(new_tokens):
        new[b, : len(n)] = torch.tensor(n, dtype=torch.int64)
    return torch.cat([input_ids.to(torch.int64), new], dim=1)


def final_stats(counters, settings: dict, start: float, row_settings: list[dict] | None = None,
                **extra) -> dict:
    """The statistics of a call: the summed ``counters`` with their rates, wall-clock time since
    ``start`` (``time.perf_counter()``), the ``settings`` used and any ``extra`` figures; under
    ``per_sequence`` each sequence's own counters and rates (one dict per sequence, in order),
    with its own entry of ``row_settings`` where given."""
    total = Counters()
    for c in counters:
        total += c
    stats = total.as_dict(time.perf_counter() - start)
    stats["per_sequence"] = [_own(c) for c in counters]
    if row_settings is not None:
        for own, row in zip(stats["per_sequence"], row_settings, strict=True):
            own.update(row)
    stats.update(extra)
    stats.update(settings)
    return stats


def call_settings(settings: dict, **per_row) -> tuple[dict, list[dict]]:
    """The settings a call used: ``settings`` (the configuration's) with each ``per_row`` value
    (a list of one value per sequence, or None: the configuration's) in its place: one value
    where every sequence used the same, else the list. Returns that and each sequence's own
    settings (the keys of ``per_row`` that were given)."""
    given = {k: list(v) for k, v in per_row.items() if v is not None}
    B = len(next(iter(given.values()))) if given else 0
    out = dict(settings)
    for k, values in given.items():
        out[k] = values[0] if all(v == values[0] for v in values) else values
    return out, [{k: values[b] for k, values in given.items()} for b in range(B)]


def _own(c: Counters) -> dict:
    """One sequence's counters and rates (the wall-clock figures are the call's)."""
    d = c.as_dict()
    del d["wall_s"], d["tokens_per_s"]
    return d
