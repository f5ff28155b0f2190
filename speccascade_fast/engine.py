"""The decoding engine on Hugging Face models: speculative cascades and their baselines.

:func:`generate` decodes with a drafter ``q`` and a verifier ``p`` (any pair of HF causal LMs, or of
encoder-decoder LMs, with the same vocabulary). The block loop reads as Algorithm 4 of the paper:

    draft    - the drafter proposes gamma tokens x_t .. x_{t+gamma-1} ~ qT;
    score    - ONE verifier call scores all gamma+1 positions;
    verify   - :func:`speccascade_fast.verify` decides, accepts and resamples (all the math);
               with ``bonus="cascade"`` (a rule other than ``spec``), when every draft was
               accepted and a bonus token can be kept, one more drafter step gives q at the bonus
               position and the block is verified again with it (the same decisions, counter-based
               randomness); a block that rejects a draft never pays that step;
    accept   - emit the accepted drafts and the residual/bonus token, stop at EOS / the budget;
    rollback - crop both KV caches back to the emitted prefix.

The sequential baselines (SEMANTICS §5) are short loops beside it. This is the simple engine:
one sequence at a time with HF ``DynamicCache`` caches (a batch is decoded row by row); the fast
batched static-cache engine is separate.

Randomness (SEMANTICS §6). Sequence ``b`` of a batch uses the seed ``seed + b`` (or ``seed[b]``
when ``seed`` is a list/tensor of B ints). Every random draw is keyed by that seed and the
**absolute position** of the token being decided: its index in the unpadded sequence (prompt
tokens first, so the first new token of a P-token prompt has position P; for encoder-decoder
models the index in the decoder sequence, whose position 0 is ``decoder_start_token_id``).
Drafts and every single-distribution draw (autoregressive, drafter_only, token/oracle/seq
cascades) go through :func:`speccascade_fast.sample` (stream DRAFT); acceptance and residual/bonus
draws happen inside :func:`speccascade_fast.verify` (streams ACCEPT, RESIDUAL). Hence a
sequence's output does not depend on the batch it rides in, nor on left padding.
"""
from __future__ import annotations

import inspect
import math
import os
import time
from dataclasses import dataclass, field

import torch

from . import probs, rng
from .rules import DRAFTER_ONLY_RULES, PREFIX_RULES, RULES, check_alpha, check_rule, defer
from .sampling import draft_probability, sample
from .stats import Counters
from .verify import verify

METHODS = (
    "spec_cascade", "token_cascade", "oracle_cascade", "seq_cascade", "autoregressive",
    "drafter_only",
)
BONUS = ("cascade", "verifier")
ENGINES = ("auto", "static", "sequential")
SEQ_SCORES = ("prob", "mean_logprob")

# The rule each method uses when ``rule=None``.
DEFAULT_RULE = {"spec_cascade": "token_v3", "token_cascade": "chow", "oracle_cascade": "diff"}

# The lenience used when ``alpha=None`` (per rule; ``seq_cascade`` uses DEFAULT_SEQ_ALPHA).
# token_v3 = 0.3: a draft is acceptable when the verifier gives it at least 70 % of the
# probability of its own top token, i.e. near-ties of the verifier are settled in the drafter's
# favour and confident verifier choices are kept; quality stays at the verifier's level while
# most verifier/drafter disagreements on code (formatting, synonyms) stop costing a rejection.
# The others sit at a comparable, moderate point of their ranges; sweep alpha for real use.
DEFAULT_ALPHA: dict[str, float | None] = {
    "spec": None, "drafter": None,
    "chow": 0.2,          # defer when the drafter's top probability is below 0.8
    "chow_log": 0.5,      # defer when the drafter's entropy exceeds 0.5 nats
    "diff": 0.0, "diff_log": 0.0,  # defer when the drafter is less confident than the verifier
    "opt": 0.0, "opt_log": 0.0,
    "token_v1": 0.1, "token_v2": 0.1,
    "token_v3": 0.3,
    "lossy": 0.2, "lossy_star": 0.2,
    "bild": 1.0,          # defer when -log p(draft) > 1 (p(draft) < 0.37) at T = 0
}
DEFAULT_SEQ_ALPHA = 0.5
DEFAULT_MAX_DRAFTER_RUN = 10
# seq_cascade: the verifier's rewrite uses the sequence seed mixed with this salt, so that its
# noise is independent of the drafter's answer (which decided the deferral).
_REWRITE_SALT = 0x5EC0CA5CADE


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
class _Config:
    method: str
    rule: str | None
    alpha: float | None
    gamma: int
    temperature: float
    top_k: int | None
    top_p: float | None
    bonus: str
    max_drafter_run: int | None
    seq_score: str
    backend: str
    draft_confidence: float | None = None

    @property
    def bonus_step(self) -> bool:
        """Whether a block runs the drafter at the bonus position: ``bonus="cascade"`` needs q
        there, except under ``spec``, whose bonus law is pT whatever q is (the verification
        then draws the same token without it)."""
        return self.bonus == "cascade" and self.rule != "spec"

    def draw(self, logits: torch.Tensor, seed: int, position: int) -> int:
        """One token from ``softmax(logits / T)`` (truncated), ``logits`` ``[1, V]``."""
        x = sample(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                   seed=seed, positions=position)
        return int(x[0])


# --- a model and its KV cache over one growing sequence ---------------------------------------
class _CachedModel:
    """One HF model with a ``DynamicCache`` over one sequence (batch 1).

    ``logits(ids, n)`` feeds the tokens of ``ids`` [1, L] the cache has not seen and returns the
    logits of the last ``n`` positions, ``[1, n, V]`` float32 (row i is the distribution of the
    token at position ``L - n + 1 + i``). ``rollback(length)`` crops the cache to ``length``.
    """

    def __init__(self, model, encoder_ids: torch.Tensor | None = None):
        self.model = model
        self.calls = 0
        self.encdec = _is_encoder_decoder(model)
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
        self.keep_arg = _accepts(model, "logits_to_keep")
        self.cache_arg = _cache_kwarg(model) or "past_key_values"

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
        return out.logits[:, -n:].float()

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
    stats: Counters = field(default_factory=Counters)
    new: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def remaining(self) -> int:
        return self.budget - len(self.new)

    def emit(self, tokens: list[int], deferred: list[bool] | None = None) -> int:
        """Append ``tokens`` up to the first EOS and the budget; returns how many were kept."""
        kept = []
        for x in tokens[: self.remaining]:
            kept.append(x)
            if x in self.eos:
                self.done = True
                break
        if kept:
            self.new.extend(kept)
            self.ids = torch.cat([self.ids, self.ids.new_tensor([kept])], dim=1)
        if self.remaining <= 0:
            self.done = True
        self.stats.tokens += len(kept)
        if deferred is not None:
            self.stats.deferred += sum(bool(d) for d in deferred[: len(kept)])
        return len(kept)


# --- speculative cascades: Algorithm 4 ----------------------------------------------------------
def draft(q: _CachedModel, seq: _Sequence, gamma: int, cfg: _Config):
    """The drafter proposes up to ``gamma`` tokens ``x_t ~ qT_t`` (t = seq.length ...), stopping
    early after an EOS draft. Returns ``(drafts [1, g], q_logits [1, g, V])``. With
    ``cfg.draft_confidence`` it also stops after a draft the drafter gave a probability below it
    (:func:`~speccascade_fast.sampling.draft_probability`)."""
    ids, t, rows = seq.ids, seq.length, []
    for j in range(gamma):
        logits = q.next_logits(ids)
        x = cfg.draw(logits, seq.seed, t + j)
        rows.append(logits)
        ids = torch.cat([ids, ids.new_tensor([[x]])], dim=1)
        if x in seq.eos or _unsure(cfg, logits, ids[0, -1:]):
            break
    return ids[:, t:], torch.stack(rows, dim=1)


def bonus_keepable(drafts: list[int], remaining: int, eos) -> bool:
    """Whether a bonus token after these drafts could be emitted by a sequence with
    ``remaining`` tokens of budget and EOS ids ``eos``: the budget has room for it and the last
    draft is not EOS. (Otherwise the verifier's bonus stands in: it decides a token that is cut
    anyway, so no bonus drafter step is run for it.) Both engines ask this."""
    return len(drafts) < remaining and drafts[-1] not in eos


def _unsure(cfg: _Config, logits: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``draft_confidence`` ends the block after draft ``x`` (``logits`` ``[1, V]``)."""
    return (cfg.draft_confidence is not None
            and float(draft_probability(logits, x, cfg.temperature)) < cfg.draft_confidence)


def score(p: _CachedModel, seq: _Sequence, drafts: torch.Tensor) -> torch.Tensor:
    """One verifier call: p at positions ``t .. t+g``, ``[1, g+1, V]``."""
    return p.logits(torch.cat([seq.ids, drafts], dim=1), drafts.shape[1] + 1)


def speculative_block(q: _CachedModel, p: _CachedModel, seq: _Sequence, cfg: _Config) -> None:
    """Draft, score, verify, accept, roll back: one block of the speculative cascade."""
    t = seq.length
    gamma = min(cfg.gamma, seq.remaining)  # never draft past the budget
    drafts, q_logits = draft(q, seq, gamma, cfg)
    p_logits = score(p, seq, drafts)

    def verified(q_logits):
        return verify(q_logits, drafts, p_logits, rule=cfg.rule, alpha=cfg.alpha,
                      temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                      seed=seq.seed, positions=t, backend=cfg.backend)

    out = verified(q_logits)  # with g rows of q: the bonus from pT
    a, g = int(out.num_accepted[0]), drafts.shape[1]
    if cfg.bonus_step and a == g and bonus_keepable(drafts[0].tolist(), seq.remaining, seq.eos):
        # the bonus token follows the cascade's target: q at the bonus position, run only now
        # that the bonus is known to be emitted; the decisions up to it are drawn again from the
        # same keys, so they do not change
        bonus_q = q.next_logits(torch.cat([seq.ids, drafts], dim=1))
        out = verified(torch.cat([q_logits, bonus_q[:, None]], dim=1))
        a = int(out.num_accepted[0])
    seq.emit(out.tokens[0, : a + 1].tolist(), out.deferred[0].tolist())
    seq.stats.blocks += 1
    seq.stats.drafted += g
    seq.stats.accepted += a
    seq.stats.rejected += int(a < g)
    # accept: the caches keep the prefix up to the last accepted draft; the emitted last token
    # (residual or bonus) is fed at the start of the next block
    q.rollback(t + a)
    p.rollback(t + a)


def spec_cascade(q, p, seq, cfg) -> None:
    while not seq.done:
        speculative_block(q, p, seq, cfg)


# --- sequential baselines (SEMANTICS §5) --------------------------------------------------------
def autoregressive(model: _CachedModel, seq: _Sequence, cfg: _Config, *, deferred: bool,
                   seed: int | None = None, score: bool = False) -> list[float]:
    """Plain decoding with one model. With ``score``, returns the unscaled log-probabilities
    ``log softmax(logits)[x]`` of the emitted tokens (seq_cascade's score)."""
    seed = seq.seed if seed is None else seed
    logprobs = []
    while not seq.done:
        logits = model.next_logits(seq.ids)
        x = cfg.draw(logits, seed, seq.length)
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
        seq.emit([cfg.draw(logits, seq.seed, seq.length)], [delta])


def oracle_cascade(q, p, seq, cfg) -> None:
    """Algorithm 3: both models at every position; the prefix rule's delta picks the law."""
    while not seq.done:
        q_logits, p_logits = q.next_logits(seq.ids), p.next_logits(seq.ids)
        delta = _defer(cfg, q_logits, p_logits)
        logits = p_logits if delta else q_logits
        seq.emit([cfg.draw(logits, seq.seed, seq.length)], [delta])


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


def _defer(cfg: _Config, q_logits: torch.Tensor, p_logits: torch.Tensor) -> bool:
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


# --- the public entry point ---------------------------------------------------------------------
def generate(
    drafter,
    verifier,
    input_ids,
    *,
    method: str = "spec_cascade",
    rule: str | None = None,
    alpha: float | None = None,
    gamma: int = 5,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_new_tokens: int = 64,
    eos_token_id=None,
    pad_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    seed=0,
    bonus: str = "cascade",
    max_drafter_run: int | None = DEFAULT_MAX_DRAFTER_RUN,
    seq_score: str = "prob",
    backend: str = "auto",
    engine: str = "auto",
    cuda_graphs: bool | None = None,
    attention: str | None = None,
    draft_confidence: float | None = None,
) -> GenerateOutput:
    """Decode ``input_ids`` with a drafter/verifier pair.

    Args:
        drafter, verifier: HF ``*ForCausalLM`` (or both ``*ForConditionalGeneration``
            encoder-decoder) models sharing one vocabulary, or strings / paths that
            :func:`speccascade_fast.models.load_model` loads (a named model, a local HF folder,
            a ``.gguf`` file). ``autoregressive`` needs only the verifier and ``drafter_only``
            only the drafter (the other may be None).
        input_ids: int64 ``[B, P]`` (or ``[P]``): the prompts (encoder inputs for encoder-decoder
            models). Left (or right) padding is allowed with ``attention_mask``.
        method: ``spec_cascade`` (Algorithm 4 with ``rule``; ``rule="spec"`` is lossless
            speculative decoding), ``token_cascade`` (Algorithm 2, rules chow/chow_log),
            ``oracle_cascade`` (Algorithm 3, any prefix rule, spec or drafter),
            ``seq_cascade`` (eq. 1, rule ignored), ``autoregressive`` (verifier only),
            ``drafter_only``.
        rule: one of :data:`speccascade_fast.RULES`; None picks :data:`DEFAULT_RULE` of the
            method (``token_v3`` for ``spec_cascade``).
        alpha: the rule's lenience; None picks :data:`DEFAULT_ALPHA` (``token_v3``: 0.3) or, for
            ``seq_cascade``, :data:`DEFAULT_SEQ_ALPHA`.
        gamma: drafts per verifier call (>= 1); with ``draft_confidence``, the most.
        temperature, top_k, top_p: as in :func:`speccascade_fast.verify` (T = 0: greedy).
        max_new_tokens: the most new tokens per sequence (>= 1).
        eos_token_id: int or list of ints; None takes the verifier's (else the drafter's)
            ``generation_config.eos_token_id``; ``[]`` never stops early.
        pad_token_id: fills finished rows; None takes the generation config's pad token, else
            the first EOS id, else 0.
        attention_mask: ``[B, P]``, 1 on prompt tokens, 0 on padding.
        seed: int (sequence b uses ``seed + b``) or B ints.
        bonus: ``"cascade"`` (the bonus token follows the cascade's target exactly: it needs q
            at the bonus position, one more drafter step, run only in blocks that accept every
            draft, except inside a CUDA graph, which runs it in every block) or ``"verifier"``
            (bonus from pT, no extra drafter step).
        max_drafter_run: ``token_cascade``: defer after this many consecutive drafter tokens
            (None disables).
        seq_score: ``seq_cascade``: ``"prob"`` or ``"mean_logprob"``.
        backend: the verification backend (see :func:`speccascade_fast.verify`).
        engine: ``"auto"`` runs ``spec_cascade``, ``autoregressive`` and ``drafter_only`` on
            decoder-only models on the batched static-cache :class:`speccascade_fast.Engine`
            (the whole batch at once) and everything else on the sequential loops (one sequence
            at a time, HF ``DynamicCache``); ``"static"`` insists on the former (ValueError where
            it cannot run), ``"sequential"`` forces the latter. Both emit the same tokens for
            the same seeds; ``drafter_calls`` may differ (the static engine drafts gamma tokens
            in every block of a batch, the sequential one stops at an EOS draft or the budget).
        cuda_graphs: the batched Engine's CUDA graphs (:class:`speccascade_fast.Engine`):
            None = on for CUDA models; the sequential loops ignore it.
        attention: the batched Engine's attention: None (the models' own, SDPA or eager) or
            ``"flash_attn"`` (flash-attn's ``flash_attn_with_kvcache``; CUDA, fp16/bf16).
        draft_confidence: ``spec_cascade`` only: None (every block drafts ``gamma`` tokens) or
            a number in (0, 1): a sequence's block ends after the first draft whose drafter
            probability is below it (``softmax(q / T)`` of the draft, at T = 1 when greedy:
            Hugging Face's ``assistant_confidence_threshold``, fixed), so unsure drafts, which
            are mostly rejected, cost no further drafter steps. The output law is unchanged
            (the stopping decision reads only the drafter); the tokens for a seed may differ
            from fixed blocks' where a block boundary moves (a position drawn as a bonus
            token instead of a draft uses another random stream). Each drafter step is then
            followed by a host read (the batched Engine's CUDA graphs: one per drafter step
            and one for the verification).

    Returns:
        :class:`GenerateOutput` ``(sequences, stats, new_tokens)``. ``stats`` sums over the
        batch (definitions in :mod:`speccascade_fast.stats`): ``rejection_rate`` = rejected /
        verified drafts; ``deferral_rate`` = the fraction of emitted positions whose
        ``deferred`` flag was set (their law came from the verifier); ``deferrals_per_token``
        = verifier calls / tokens; ``tokens_per_verifier_call`` = tokens / verifier calls.

    Example:
        >>> out = generate(drafter, verifier, tok("def f(", return_tensors="pt").input_ids,
        ...                rule="token_v3", alpha=0.3, temperature=0, max_new_tokens=32)
        >>> tok.decode(out.sequences[0]), out.stats["tokens_per_verifier_call"]
    """
    start = time.perf_counter()
    cfg = _config(method, rule, alpha, gamma, temperature, top_k, top_p, bonus,
                  max_drafter_run, seq_score, backend, draft_confidence)
    drafter, verifier = _loaded(drafter), _loaded(verifier)
    drafter, verifier = _check_models(method, drafter, verifier)
    main = verifier if verifier is not None else drafter
    prompts, input_ids = _prompts(input_ids, attention_mask)
    _check_lengths(drafter, verifier, prompts, max_new_tokens)
    seeds = _seeds(seed, len(prompts))
    eos = _eos_ids(eos_token_id, verifier, drafter)
    pad = _pad_id(pad_token_id, main, eos)
    encdec = _is_encoder_decoder(main)
    device = _device(main)

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not known; choose one of {', '.join(ENGINES)}")
    if engine != "sequential":
        from . import static_engine
        if static_engine.supports(method, drafter, verifier, attention=attention):
            longest = max(p.numel() for p in prompts)
            eng = static_engine.Engine(
                drafter, verifier, max_batch_size=len(prompts),
                max_seq_len=longest + max_new_tokens, method=method, rule=cfg.rule,
                alpha=cfg.alpha, gamma=gamma, temperature=temperature, top_k=top_k, top_p=top_p,
                bonus=bonus, backend=backend, cuda_graphs=cuda_graphs, attention=attention,
                draft_confidence=draft_confidence)
            out = eng.generate(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                               seed=seeds, eos_token_id=sorted(eos), pad_token_id=pad)
            out.stats["wall_s"] = time.perf_counter() - start
            out.stats["tokens_per_s"] = out.stats["tokens"] / out.stats["wall_s"]
            return out
        if engine == "static":
            why = [w for w in (static_engine.unsupported_reason(m, attention)
                               for m in (drafter, verifier)) if w]
            raise ValueError(f"engine='static' cannot run method={method!r} here: "
                             f"{why[0] if why else 'it runs ' + ', '.join(static_engine.METHODS)}")
    for name, value in (("cuda_graphs", cuda_graphs), ("attention", attention)):
        if value:
            raise ValueError(f"{name}={value!r} needs the batched Engine, which does not run "
                             f"method={method!r} with engine={engine!r} on these models")

    total, new_tokens, outputs = Counters(), [], []
    with torch.inference_mode():
        for prompt, s in zip(prompts, seeds):
            prompt = prompt.to(device)
            seq = _decode(drafter, verifier, prompt, s, max_new_tokens, eos, cfg, encdec)
            total += seq.stats
            new_tokens.append(seq.new)
            outputs.append(seq.ids[0])
    sequences = _assemble(input_ids.to(device), outputs, new_tokens, pad, encdec)
    stats = total.as_dict(time.perf_counter() - start)
    stats.update(method=method, rule=cfg.rule, alpha=cfg.alpha, gamma=cfg.gamma, bonus=cfg.bonus,
                 temperature=cfg.temperature, draft_confidence=cfg.draft_confidence)
    return GenerateOutput(sequences, stats, new_tokens)


def _loaded(model):
    """A model given by name or path is loaded with :func:`speccascade_fast.models.load_model`."""
    if isinstance(model, (str, os.PathLike)):
        from .models import load_model
        return load_model(model)[0]
    return model


def _decode(drafter, verifier, prompt, seed, max_new_tokens, eos, cfg, encdec) -> _Sequence:
    """Decode one prompt (1-D, unpadded) with the method of ``cfg``."""
    if encdec:
        start_id = _decoder_start_id(verifier if verifier is not None else drafter)
        ids = prompt.new_tensor([[start_id]])
        enc = prompt[None]
    else:
        ids, enc = prompt[None], None
    seq = _Sequence(ids, seed, max_new_tokens, eos)
    seq.stats.sequences = 1
    q = _CachedModel(drafter, enc) if drafter is not None else None
    p = _CachedModel(verifier, enc) if verifier is not None else None
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


# --- argument checks ----------------------------------------------------------------------------
def _config(method, rule, alpha, gamma, temperature, top_k, top_p, bonus, max_drafter_run,
            seq_score, backend, draft_confidence=None) -> _Config:
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not known; choose one of {', '.join(METHODS)}")
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be an int >= 1 (drafts per verifier call), got {gamma!r}")
    if bonus not in BONUS:
        raise ValueError(f"bonus={bonus!r} is not known; choose 'cascade' or 'verifier'")
    if seq_score not in SEQ_SCORES:
        raise ValueError(f"seq_score={seq_score!r} is not known; choose 'prob' or 'mean_logprob'")
    if max_drafter_run is not None and (isinstance(max_drafter_run, bool)
                                        or not isinstance(max_drafter_run, int)
                                        or max_drafter_run < 0):
        raise ValueError(f"max_drafter_run must be None or an int >= 0, got {max_drafter_run!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")

    if draft_confidence is not None:
        draft_confidence = check_draft_confidence(draft_confidence)
        if method != "spec_cascade":
            raise ValueError(f"draft_confidence applies to method='spec_cascade' only, got "
                             f"method={method!r}")

    if method in ("autoregressive", "drafter_only"):
        rule, alpha = None, None
    elif method == "seq_cascade":
        rule = None
        alpha = DEFAULT_SEQ_ALPHA if alpha is None else alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] for seq_cascade, got {alpha!r}")
    else:
        rule = DEFAULT_RULE[method] if rule is None else rule
        check_rule(rule)
        if method == "token_cascade" and rule not in DRAFTER_ONLY_RULES:
            raise ValueError(f"rule={rule!r} needs the verifier; token_cascade takes "
                             f"{' or '.join(sorted(DRAFTER_ONLY_RULES))}")
        if method == "oracle_cascade" and rule not in PREFIX_RULES | {"spec", "drafter"}:
            raise ValueError(f"rule={rule!r} is not a prefix rule; oracle_cascade takes "
                             f"{', '.join(sorted(PREFIX_RULES))}, spec or drafter")
        alpha = DEFAULT_ALPHA[rule] if alpha is None else alpha
        check_alpha(rule, alpha)
        alpha = None if alpha is None else float(alpha)
    return _Config(method, rule, alpha, gamma, float(temperature), top_k,
                   None if top_p is None else float(top_p), bonus, max_drafter_run, seq_score,
                   backend, draft_confidence)


def check_draft_confidence(value) -> float:
    """``value`` as a float in (0, 1), else ValueError naming ``draft_confidence``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"draft_confidence must be None or a number in (0, 1) (the drafter "
                         f"probability below which a block stops drafting), got {value!r}")
    return float(value)


def _check_models(method, drafter, verifier):
    needs_q = method != "autoregressive"
    needs_p = method != "drafter_only"
    if needs_q and drafter is None:
        raise ValueError(f"drafter is required for method={method!r}")
    if needs_p and verifier is None:
        raise ValueError(f"verifier is required for method={method!r}")
    drafter = drafter if needs_q else None
    verifier = verifier if needs_p else None
    for name, m in (("drafter", drafter), ("verifier", verifier)):
        if m is not None and not callable(m):
            raise ValueError(f"{name} must be a Hugging Face model, got {type(m).__name__}")
    if drafter is not None and verifier is not None:
        vq, vp = _vocab_size(drafter), _vocab_size(verifier)
        if vq != vp:
            raise ValueError(f"drafter and verifier vocabularies differ: the drafter's LM head "
                             f"has {vq} outputs, the verifier's {vp}")
        if _is_encoder_decoder(drafter) != _is_encoder_decoder(verifier):
            raise ValueError("drafter and verifier must both be decoder-only or both "
                             "encoder-decoder models")
    return drafter, verifier


def _prompts(input_ids, attention_mask):
    """Unpadded 1-D prompts and the (2-D) ``input_ids``."""
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
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): a prompt needs at "
                         "least one token")
    if attention_mask is None:
        return list(input_ids), input_ids
    attention_mask = torch.as_tensor(attention_mask)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal "
                         f"input_ids shape {tuple(input_ids.shape)}")
    keep = attention_mask.to(input_ids.device).bool()
    prompts = [row[k] for row, k in zip(input_ids, keep)]
    if any(p.numel() == 0 for p in prompts):
        raise ValueError("input_ids has an empty prompt (a row whose attention_mask is all 0)")
    return prompts, input_ids


def _check_lengths(drafter, verifier, prompts, max_new_tokens):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    longest = max(p.numel() for p in prompts)
    for name, m in (("drafter", drafter), ("verifier", verifier)):
        if m is None:
            continue
        n = longest if not _is_encoder_decoder(m) else 1  # decoder starts from one token
        limit = _context(m)
        if limit is not None and n + max_new_tokens > limit:
            raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"{name}'s context of {limit} tokens (max_position_embeddings)")


def _seeds(seed, B) -> list[int]:
    if isinstance(seed, bool):
        raise ValueError("seed must be an int or a list/tensor of B ints, got a bool")
    if isinstance(seed, int):
        return [seed + b for b in range(B)]
    if isinstance(seed, torch.Tensor):
        if seed.is_floating_point() or seed.dim() != 1:
            raise ValueError(f"seed tensor must be 1-D integer [B], got {seed.dtype} "
                             f"{tuple(seed.shape)}")
        seed = seed.tolist()
    if isinstance(seed, (list, tuple)) and len(seed) == B and all(
            isinstance(s, int) and not isinstance(s, bool) for s in seed):
        return list(seed)
    raise ValueError(f"seed must be an int or a list/tensor of {B} ints (one per sequence)")


def _eos_ids(eos_token_id, verifier, drafter) -> frozenset[int]:
    if eos_token_id is None:
        for m in (verifier, drafter):
            gc = getattr(m, "generation_config", None)
            if gc is not None and gc.eos_token_id is not None:
                eos_token_id = gc.eos_token_id
                break
        else:
            return frozenset()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
        return frozenset([eos_token_id])
    if isinstance(eos_token_id, (list, tuple, set, frozenset)) and all(
            isinstance(e, int) and not isinstance(e, bool) for e in eos_token_id):
        return frozenset(eos_token_id)
    raise ValueError(f"eos_token_id must be None, an int or a list of ints, got {eos_token_id!r}")


def _pad_id(pad_token_id, model, eos) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    gc = getattr(model, "generation_config", None)
    if gc is not None and gc.pad_token_id is not None:
        pad = gc.pad_token_id
        return int(pad[0] if isinstance(pad, (list, tuple)) else pad)
    return min(eos) if eos else 0


def _assemble(input_ids, outputs, new_tokens, pad, encdec) -> torch.Tensor:
    """HF-style ``sequences``: prompts as given + new tokens, right-padded with ``pad``."""
    width = max(len(n) for n in new_tokens)
    if encdec:
        L = max(o.numel() for o in outputs)
        out = torch.full((len(outputs), L), pad, dtype=torch.int64, device=input_ids.device)
        for b, o in enumerate(outputs):
            out[b, : o.numel()] = o
        return out
    new = torch.full((input_ids.shape[0], width), pad, dtype=torch.int64, device=input_ids.device)
    for b, n in enumerate(new_tokens):
        new[b, : len(n)] = torch.tensor(n, dtype=torch.int64)
    return torch.cat([input_ids.to(torch.int64), new], dim=1)


# --- model introspection --------------------------------------------------------------------------
def _is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _text_config(model):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if get is not None else cfg


def _vocab_size(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(_text_config(model).vocab_size)


def _context(model) -> int | None:
    limit = getattr(_text_config(model), "max_position_embeddings", None)
    return int(limit) if limit else None


def _decoder_start_id(model) -> int:
    for src in (getattr(model, "generation_config", None), model.config):
        v = getattr(src, "decoder_start_token_id", None)
        if v is not None:
            return int(v)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    raise ValueError("the encoder-decoder model has no decoder_start_token_id in its config")


def _device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_kwarg(model) -> str | None:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` (transformers >=
    5.24, which deprecates the old name), ``past_key_values`` (earlier), or None (neither)."""
    for name in ("cache", "past_key_values"):
        if _accepts(model, name):
            return name
    return None


__all__ = ["DEFAULT_ALPHA", "DEFAULT_RULE", "GenerateOutput", "METHODS", "RULES", "generate"]
