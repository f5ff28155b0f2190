"""The sequential decoding loops: one sequence at a time on HF ``DynamicCache`` caches.

They are the independent oracle the batched :class:`speccascade_fast.Engine` is tested against,
and they run what the Engine does not: the sequential baselines (docs/semantics.md §5: Algorithm 2
``token_cascade``, Algorithm 3 ``oracle_cascade``, eq. (1) ``seq_cascade``) and encoder-decoder
models. A block of ``spec_cascade`` reads as Algorithm 4 of the paper:

    draft    - the drafter proposes gamma tokens x_t .. x_{t+gamma-1} ~ qT;
    score    - ONE verifier call scores all gamma+1 positions;
    verify   - :func:`speccascade_fast.verify` decides, accepts and resamples (all the math);
               with ``bonus="cascade"`` (a rule other than ``spec``), when every draft was
               accepted and a bonus token can be kept, one more drafter step gives q at the bonus
               position and the block is verified again with it (the same decisions, counter-based
               randomness); a block that rejects a draft never pays that step;
    accept   - emit the accepted drafts and the residual/bonus token, stop at EOS / the budget;
    rollback - crop both KV caches back to the emitted prefix.

Randomness (docs/semantics.md §6): every draw is keyed by the sequence's seed and the absolute
position of the token being decided (its index in the unpadded sequence; for encoder-decoder
models, in the decoder sequence, whose position 0 is ``decoder_start_token_id``). Drafts and
every single-distribution draw go through :func:`speccascade_fast.sample` (stream DRAFT);
acceptance and residual/bonus draws happen inside :func:`speccascade_fast.verify` (streams ACCEPT,
RESIDUAL). Hence a sequence's output does not depend on the batch it rides in, nor on padding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import model_facts, outputs, probs, rng
from .config import DecodeConfig
from .outputs import bonus_keepable
from .rules import defer
from .sampling import draft_probability, sample
from .stats import Counters
from .verify import verify

# seq_cascade: the verifier's rewrite uses the sequence seed mixed with this salt, so that its
# noise is independent of the drafter's answer (which decided the deferral).
_REWRITE_SALT = 0x5EC0CA5CADE


def _draw(cfg: DecodeConfig, logits: torch.Tensor, seed: int, position: int) -> int:
    """One token from ``softmax(logits / T)`` (truncated), ``logits`` ``[1, V]``."""
    x = sample(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
               min_p=cfg.min_p, seed=seed, positions=position)
    return int(x[0])


# --- a model and its KV cache over one growing sequence ---------------------------------------
class _CachedModel:
    """One HF model with a ``DynamicCache`` over one sequence (batch 1).

    ``logits(ids, n)`` feeds the tokens of ``ids`` [1, L] the cache has not seen and returns the
    logits of the last ``n`` positions, ``[1, n, V]`` float32 (row i is the distribution of the
    token at position ``L - n + 1 + i``), each row passed through ``processor`` (the config's
    ``logits_processor``) with the tokens before its position. ``rollback(length)`` crops the
    cache to ``length``.
    """

    def __init__(self, model, encoder_ids: torch.Tensor | None = None, processor=None):
        self.model = model
        self.processor = processor
        self.calls = 0
        self.encdec = model_facts.is_encoder_decoder(model)
        if self.encdec:
            from transformers import DynamicCache, EncoderDecoderCache
            mask = torch.ones_like(encoder_ids)
            self.encoder_kwargs = {
                "encoder_outputs": model.get_encoder()(input_ids=encoder_ids, attention_mask=mask),
                "attention_mask": mask,
            }
            self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        else:
            from transformers import DynamicCache
            self.encoder_kwargs = {}
            # no config: every layer keeps all its states, sliding-window layers too (their
            # window is the attention mask's, which HF builds from the positions), so a rollback
            # is a crop on every layer. (A config-built cache gives sliding layers a cache that
            # drops old states, whose rollback and masks differ across transformers 5.x.)
            self.cache = DynamicCache()
        self.keep_arg = model_facts.accepts(model, "logits_to_keep")
        self.cache_arg = model_facts.cache_kwarg(model) or "past_key_values"

    def seen(self) -> int:
        return self.cache.get_seq_length()

    def logits(self, ids: torch.Tensor, n: int = 1) -> torch.Tensor:
        new = ids[:, self.seen():]
        assert new.shape[1] >= n >= 1, (new.shape, n)
        kwargs = dict(self.encoder_kwargs, use_cache=True, **{self.cache_arg: self.cache})
        if self.keep_arg:
            kwargs["logits_to_keep"] = n
        if self.encdec:
            out = self.model(decoder_input_ids=new, **kwargs)
        else:
            out = self.model(input_ids=new, **kwargs)
        self.calls += 1
        logits = out.logits[:, -n:].float()
        if self.processor is None:
            return logits
        first = ids.shape[1] - n + 1  # the position row 0 predicts
        return torch.stack([self.processor(ids[:, : first + i], logits[:, i]).float()
                            for i in range(n)], dim=1)

    def next_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """q or p at position ``len(ids)``: ``[1, V]``."""
        return self.logits(ids, 1)[:, -1]

    def rollback(self, length: int) -> None:
        extra = self.seen() - length
        if extra > 0:
            self.cache.crop(-extra)


# --- one sequence being decoded -----------------------------------------------------------------
@dataclass
class _Sequence:
    """The growing sequence ``ids`` [1, L] of one row, its budget and its counters."""

    ids: torch.Tensor
    seed: int
    budget: int
    eos: frozenset[int]
    index: int = 0  # the sequence's index in the batch (what the hooks are told)
    hooks: outputs.Hooks = outputs.NO_HOOKS
    stats: Counters = field(default_factory=Counters)
    new: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def remaining(self) -> int:
        return self.budget - len(self.new)

    def emit(self, tokens: list[int], deferred: list[bool]) -> int:
        """Append ``tokens`` by the emit rule (up to the first EOS, the hooks' stop and the
        budget); returns how many were kept."""
        kept, done = self.hooks.emit(self.index, self.new, tokens, self.remaining, self.eos)
        if kept:
            self.ids = torch.cat([self.ids, self.ids.new_tensor([kept])], dim=1)
        self.done = self.done or done
        self.stats.add_emitted(kept, deferred)
        return len(kept)


# --- speculative cascades: Algorithm 4 ----------------------------------------------------------
def draft(q: _CachedModel, seq: _Sequence, gamma: int, cfg: DecodeConfig):
    """The drafter proposes up to ``gamma`` tokens ``x_t ~ qT_t`` (t = seq.length ...), stopping
    early after an EOS draft. Returns ``(drafts [1, g], q_logits [1, g, V])``. With
    ``cfg.draft_confidence`` it also stops after a draft the drafter gave a probability below it
    (:func:`~speccascade_fast.sampling.draft_probability`)."""
    ids, t, rows = seq.ids, seq.length, []
    for j in range(gamma):
        logits = q.next_logits(ids)
        x = _draw(cfg, logits, seq.seed, t + j)
        rows.append(logits)
        ids = torch.cat([ids, ids.new_tensor([[x]])], dim=1)
        if x in seq.eos or _unsure(cfg, logits, ids[0, -1:]):
            break
    return ids[:, t:], torch.stack(rows, dim=1)


def _unsure(cfg: DecodeConfig, logits: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``draft_confidence`` ends the block after draft ``x`` (``logits`` ``[1, V]``)."""
    return (cfg.draft_confidence is not None
            and float(draft_probability(logits, x, cfg.temperature)) < cfg.draft_confidence)


def score(p: _CachedModel, seq: _Sequence, drafts: torch.Tensor) -> torch.Tensor:
    """One verifier call: p at positions ``t .. t+g``, ``[1, g+1, V]``."""
    return p.logits(torch.cat([seq.ids, drafts], dim=1), drafts.shape[1] + 1)


def speculative_block(q: _CachedModel, p: _CachedModel, seq: _Sequence, cfg: DecodeConfig) -> None:
    """Draft, score, verify, accept, roll back: one block of the speculative cascade. A block
    that starts inside the exact prefix is verified losslessly (``spec``)."""
    t = seq.length
    gamma = min(cfg.gamma, seq.remaining)  # never draft past the budget
    drafts, q_logits = draft(q, seq, gamma, cfg)
    p_logits = score(p, seq, drafts)
    rule = "spec" if len(seq.new) < cfg.exact_prefix else cfg.rule
    bonus_step = cfg.bonus == "cascade" and rule != "spec"

    left = (None if cfg.divergence_budget is None
            else max(cfg.divergence_budget - seq.stats.divergence_spent, 0.0))

    def verified(q_logits):
        return verify(q_logits, drafts, p_logits, rule=rule, alpha=cfg.alpha,
                      temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                      seed=seq.seed, positions=t, divergence_budget=left, backend=cfg.backend)

    out = verified(q_logits)  # with g rows of q: the bonus from pT
    a, g = int(out.num_accepted[0]), drafts.shape[1]
    if bonus_step and a == g and bonus_keepable(drafts[0].tolist(), seq.remaining, seq.eos):
        # the bonus token follows the cascade's target: q at the bonus position, run only now
        # that the bonus is known to be emitted; the decisions up to it are drawn again from the
        # same keys, so they do not change
        bonus_q = q.next_logits(torch.cat([seq.ids, drafts], dim=1))
        out = verified(torch.cat([q_logits, bonus_q[:, None]], dim=1))
        a = int(out.num_accepted[0])
    kept = seq.emit(out.tokens[0, : a + 1].tolist(), out.deferred[0].tolist())
    if out.spent is not None:  # the charges of the emitted positions
        seq.stats.divergence_spent += sum(out.spent[0, :kept].tolist())
    seq.stats.add_block(g, a)
    # accept: the caches keep the prefix up to the last accepted draft; the emitted last token
    # (residual or bonus) is fed at the start of the next block
    q.rollback(t + a)
    p.rollback(t + a)


def spec_cascade(q, p, seq, cfg) -> None:
    while not seq.done:
        speculative_block(q, p, seq, cfg)


# --- sequential baselines (docs/semantics.md §5) --------------------------------------------------------
def autoregressive(model: _CachedModel, seq: _Sequence, cfg: DecodeConfig, *, deferred: bool,
                   seed: int | None = None, score: bool = False) -> list[float]:
    """Plain decoding with one model. With ``score``, returns the unscaled log-probabilities
    ``log softmax(logits)[x]`` of the emitted tokens (seq_cascade's score)."""
    seed = seq.seed if seed is None else seed
    logprobs = []
    while not seq.done:
        logits = model.next_logits(seq.ids)
        x = _draw(cfg, logits, seed, seq.length)
        if score:
            logprobs.append(float(torch.log_softmax(logits[0].double(), -1)[x]))
        seq.emit([x], [deferred])
    return logprobs


def token_cascade(q, p, seq, cfg) -> None:
    """Algorithm 2: per token, defer (call p on the prefix, draw from pT) iff the rule on q alone
    says so, or after ``max_drafter_run`` consecutive drafter tokens; else draw from qT."""
    run = 0
    while not seq.done:
        q_logits = q.next_logits(seq.ids)
        delta = _defer(cfg, q_logits, q_logits)
        if cfg.max_drafter_run is not None and run >= cfg.max_drafter_run:
            delta = True
        logits = p.next_logits(seq.ids) if delta else q_logits  # p catches up on the prefix
        run = 0 if delta else run + 1
        seq.emit([_draw(cfg, logits, seq.seed, seq.length)], [delta])


def oracle_cascade(q, p, seq, cfg) -> None:
    """Algorithm 3: both models at every position; the prefix rule's delta picks the law."""
    while not seq.done:
        q_logits, p_logits = q.next_logits(seq.ids), p.next_logits(seq.ids)
        delta = _defer(cfg, q_logits, p_logits)
        logits = p_logits if delta else q_logits
        seq.emit([_draw(cfg, logits, seq.seed, seq.length)], [delta])


def seq_cascade(q, p, seq, cfg) -> None:
    """Eq. (1): q writes the whole answer; p rewrites it from the prompt iff
    ``q(answer | prompt) < 1 - alpha`` (``seq_score="prob"``) or
    ``exp(mean log q) < 1 - alpha`` (``"mean_logprob"``), with unscaled q."""
    answer = _Sequence(seq.ids, seq.seed, seq.budget, seq.eos)
    logprobs = autoregressive(q, answer, cfg, deferred=False, score=True)
    total = sum(logprobs)
    s = math.exp(total) if cfg.seq_score == "prob" else math.exp(total / max(1, len(logprobs)))
    if s < 1 - cfg.alpha:
        seq.stats.sequences_deferred += 1
        autoregressive(p, seq, cfg, deferred=True, seed=_rewrite_seed(seq.seed))
    else:
        seq.emit(answer.new, [False] * len(answer.new))


def _defer(cfg: DecodeConfig, q_logits: torch.Tensor, p_logits: torch.Tensor) -> bool:
    """delta of a prefix rule at one position (``spec``: always, ``drafter``: never)."""
    if cfg.rule == "spec":
        return True
    if cfg.rule == "drafter":
        return False
    t = torch.full((1,), float(cfg.temperature), dtype=torch.float64, device=q_logits.device)
    a = torch.full((1,), float(cfg.alpha), dtype=torch.float64, device=q_logits.device)
    q1, p1 = probs.unscaled(q_logits), probs.unscaled(p_logits)
    qT = probs.scaled(q_logits, t, cfg.top_k, cfg.top_p)
    pT = probs.scaled(p_logits, t, cfg.top_k, cfg.top_p)
    return bool(defer(cfg.rule, a, q1, p1, qT, pT, t)[0])


def _rewrite_seed(seed: int) -> int:
    return int(rng.mix64(torch.tensor([seed ^ _REWRITE_SALT], dtype=torch.int64))[0])


def _decode(drafter, verifier, prompt, seed, max_new_tokens, eos, cfg, encdec, index,
            hooks) -> _Sequence:
    """Decode one prompt (1-D, unpadded) with the method of ``cfg``."""
    if encdec:
        start_id = model_facts.decoder_start_id(verifier if verifier is not None else drafter)
        ids = prompt.new_tensor([[start_id]])
        enc = prompt[None]
    else:
        ids, enc = prompt[None], None
    seq = _Sequence(ids, seed, max_new_tokens, eos, index, hooks)
    seq.stats.sequences = 1
    proc = cfg.logits_processor
    q = _CachedModel(drafter, enc, proc) if drafter is not None else None
    p = _CachedModel(verifier, enc, proc) if verifier is not None else None
    if cfg.method == "autoregressive":
        autoregressive(p, seq, cfg, deferred=True)
    elif cfg.method == "drafter_only":
        autoregressive(q, seq, cfg, deferred=False)
    else:
        {"spec_cascade": spec_cascade, "token_cascade": token_cascade,
         "oracle_cascade": oracle_cascade, "seq_cascade": seq_cascade}[cfg.method](q, p, seq, cfg)
    seq.stats.drafter_calls += q.calls if q is not None else 0
    seq.stats.verifier_calls += p.calls if p is not None else 0
    return seq


def run(cfg: DecodeConfig, drafter, verifier, prompts: list[torch.Tensor], seeds: list[int],
        max_new_tokens: int, eos: frozenset[int], device, hooks: outputs.Hooks = outputs.NO_HOOKS):
    """Decode each prompt (1-D, unpadded) on its own. Returns ``(new_tokens, decoder_outputs,
    counters)``: per sequence its new tokens, its decoder sequence (encoder-decoder models;
    else None) and its :class:`~speccascade_fast.stats.Counters`."""
    encdec = model_facts.is_encoder_decoder(verifier if verifier is not None else drafter)
    new_tokens, outputs, counters = [], [], []
    with torch.inference_mode():
        for b, (prompt, s) in enumerate(zip(prompts, seeds)):
            bind = getattr(cfg.logits_processor, "bind", None)
            if bind is not None:
                bind(b)  # a processor that needs to know which sequence it sees
            seq = _decode(drafter, verifier, prompt.to(device), s, max_new_tokens, eos, cfg,
                          encdec, b, hooks)
            new_tokens.append(seq.new)
            outputs.append(seq.ids[0])
            counters.append(seq.stats)
    return new_tokens, (outputs if encdec else None), counters
