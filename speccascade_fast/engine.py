"""The batched engine: static position-indexed KV caches and ragged acceptance.

:class:`Engine` holds a drafter and a verifier (Hugging Face decoder-only models), one
:class:`~speccascade_fast.kv_cache.SlotCache` per model sized ``max_batch_size x max_seq_len``,
and the decoding settings; ``Engine.generate`` decodes a batch of prompts of different lengths.
:func:`speccascade_fast.generate` builds one for ``spec_cascade``, ``autoregressive`` and
``drafter_only`` on decoder-only models (the other methods, and encoder-decoder models, run on the
sequential loops of :mod:`speccascade_fast.sequential`, which are also this engine's oracle).

The data path, :meth:`Engine._block`, is Algorithm 4; what makes it fast sits beside it: the
models with their static caches (:class:`~speccascade_fast.kv_cache.SlotModel`), the CUDA graphs
(:mod:`speccascade_fast.graphs`), the packed host reads (:mod:`speccascade_fast.pack`) and blocks
cut by ``draft_confidence`` (:mod:`speccascade_fast.draft_confidence`).

Prefill: both models take every row's prompt but its last token. Then one block of
``spec_cascade``, for every unfinished sequence ``b`` at once (row ``b`` holds ``L_b`` tokens;
the last, ``x_{L_b - 1}``, is not in the verifier's cache yet, and in the drafter's only if the
previous block rejected a draft or ran the bonus drafter step):

    draft   - gamma drafter calls, each followed by a batched draw ``x ~ qT`` keyed by
              (seed_b, position): the first feeds each row its 1 or 2 tokens not yet in the
              drafter's cache, the others one token;
    score   - one verifier call of gamma + 1 tokens per row;
    verify  - the fused verification backend (:mod:`speccascade_fast.backends`) for the batch;
    accept  - the device-to-host read of the block: accepted counts, final tokens, drafts,
              deferral flags and whether any logits were NaN/inf; each row emits its own
              a_b + 1 tokens;
    bonus   - with ``bonus="cascade"`` (rules other than ``spec``) the bonus token needs q at
              the bonus position, one more drafter call: inside a CUDA graph it runs in every
              block, before the verification; eagerly only when a row accepted all its drafts
              and keeps its bonus token, after the read, followed by the verification again
              (the same decisions from the same keys, now with the cascade's bonus) and a
              second read;
    rollback - nothing to undo: each model's count of valid slots drops to ``L_b + a_b``; the
              rejected drafts' slots are masked and overwritten by the next block.

Draft, score and verify are one body of device work on shapes that depend only on (batch size,
gamma, the width of the first drafter call): with ``cuda_graphs`` it is captured once per such
key and replayed (every call then attends over the whole cache, stale slots masked; the batch
is padded to its bucket, the next power of two, so that rows leaving the batch replay a few
graph sizes: :meth:`Engine._bucket`); without, it runs eagerly and attends over the block's
longest prefix only. The block's inputs reach the device in one small copy.

With ``draft_confidence`` the block's length varies: the drafter steps go on while any row
drafts (a host read after each, to see which rows drew a draft they gave less than the cut-off,
an EOS, or their last budgeted token), then one verifier call of the longest block S, and each
row is verified on its own drafts in one ragged call (``max_spec_len = S``: the flattened rows
gathered on the device, padding after the last row's). Each drafter step, and the verifier
call with the verification, is a body of fixed shapes: with ``cuda_graphs`` one graph per
(batch-size bucket, first-call width or later step, all-greedy) for the steps and one per
(batch-size bucket, S) for the verification, replayed.
The steps write their logits and drafts into the engine's step buffers and hand the next step
its input, so between two steps the host only reads the step's packed result.

Finished rows (EOS or their budget) leave the batch at the end of the block: the caches are
compacted, so they stop costing work. Shapes are fixed per block (every row drafts gamma tokens,
even past its EOS or budget); tokens past a row's EOS or budget are never emitted, and since
every decision at a position depends only on earlier positions, a row's output is the sequential
engine's, token for token (same seeds, same positions), whatever batch it rides in.
"""
from __future__ import annotations

import functools
import time

import torch

from . import backends, checks, inputs, model_facts, outputs
from .attention import ATTENTION, check_backend
from .config import DecodeConfig
from .draft_confidence import DraftConfidenceBlocks
from .goodput import AcceptanceLog, ConfidenceAcceptance, Goodput, acceptance
from .graphs import Graphs
from .kv_cache import SlotModel
from .outputs import GenerateOutput, bonus_keepable
from .pack import BlockResult, Layout, nonfinite
from .rules import ALPHA_RANGES
from .sampling import draw, max_probability
from .stats import Counters

#: the methods the engine runs (the others run on the sequential loops)
METHODS = ("spec_cascade", "autoregressive", "drafter_only")
#: ``max_seq_len`` when none is given (capped by the models' context)
DEFAULT_MAX_SEQ_LEN = 2048

#: the defaults of the Engine's decoding keyword arguments (``config=`` replaces them)
_DECODING_DEFAULTS = dict(method="spec_cascade", rule=None, alpha=None, gamma=5, temperature=1.0,
                          top_k=None, top_p=None, min_p=None, bonus="cascade", backend="auto",
                          draft_confidence=None, gamma_policy="fixed", exact_prefix=0,
                          divergence_budget=None, calibration=None)

#: a one-token step's host read: the token drawn and whether the logits were non-finite
STEP = Layout("Step", token=1, nonfinite=1)


@functools.cache
def block_layout(gamma: int, spent: bool = False, confidence: bool = False) -> Layout:
    """A fixed block's host read: the accepted count, the gamma + 1 output tokens (-1 after the
    emitted ones), the gamma drafts, the gamma + 1 deferral flags, whether the drafter's and
    the verifier's logits were non-finite, with a divergence budget each position's charge
    (float64), and for the goodput controller's confidence predictor the drafter's largest
    probability at each draft (float64)."""
    more = {"spent": [gamma + 1]} if spent else {}
    if confidence:
        more["confidence"] = [gamma]
    return Layout("Block", accepted=1, tokens=[gamma + 1], drafts=[gamma],
                  deferred=[gamma + 1], q_nonfinite=1, p_nonfinite=1, **more,
                  floats=tuple(more))


def supports(method: str, *models, attention: str | None = None) -> bool:
    """Whether the engine can run ``method`` on these models (decoder-only, an attention
    implementation whose masks it builds or ``attention="flash_attn"``, ``position_ids`` /
    KV-cache (``cache`` or ``past_key_values``) arguments)."""
    return method in METHODS and all(unsupported_reason(m, attention) is None for m in models)


def unsupported_reason(model, attention: str | None = None) -> str | None:
    """Why the engine cannot run ``model`` (None if it can, or if ``model`` is None) with the
    engine's ``attention`` (None: the model's own implementation)."""
    if model is None:
        return None
    if model_facts.is_encoder_decoder(model):
        return "encoder-decoder models run on the sequential engine"
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    if attention is None and attn not in ATTENTION:
        return (f"attn_implementation={attn!r} is not supported by the static engine "
                f"(use one of {', '.join(ATTENTION)})")
    if not (model_facts.accepts(model, "position_ids")
            and model_facts.cache_kwarg(model) is not None):
        return "the model's forward takes no position_ids / KV cache (cache or past_key_values)"
    return None


class Engine:
    """A persistent decoding engine for a drafter/verifier pair of HF decoder-only models.

    Args:
        drafter, verifier: HF ``*ForCausalLM`` models with one vocabulary (or names/paths that
            :func:`speccascade_fast.models.load_model` loads); ``autoregressive`` needs only the
            verifier, ``drafter_only`` only the drafter.
        max_batch_size: the most sequences one ``generate`` call decodes together.
        max_seq_len: the longest sequence (prompt + new tokens) the caches hold; default the
            models' context, capped at 2048. The caches are allocated once (on the first call),
            with ``gamma + 1`` slots of headroom for the last block's drafts.
        method: ``spec_cascade``, ``autoregressive`` (verifier alone) or ``drafter_only``.
        rule, alpha, gamma, temperature, top_k, top_p, min_p, bonus, backend: as in
            :func:`speccascade_fast.generate` (``temperature`` and ``alpha`` are defaults that
            ``generate`` may override per sequence).
        compile_drafter: run the drafter's one-token steps ``torch.compile``d (dynamic shapes;
            the first calls compile, later Engines on the same drafter reuse the code). The
            tokens are the eager ones up to floating-point near-ties (fused kernels round
            differently); exactness towards the target is untouched either way.
        cuda_graphs: capture each block (the gamma (+1) drafter steps with their draws, the
            verifier's block forward, the fused verification and the packing of the block's
            one host read) as one CUDA graph per (batch-size bucket: the next power of two,
            at most ``max_batch_size``; width of the drafter's first call; the block's gamma;
            the rows' rules; all-greedy or not),
            replayed (with ``draft_confidence``: a graph per drafter step and one for the
            verifier call with the verification, see the module docstring). None (default):
            on when the models are on a CUDA device and ``compile_drafter`` is off. With
            ``top_k`` / ``top_p`` the captured keep bounds come from torch's top-k and the
            Triton search of top-p's bound (no host read).
        attention: None (default): the models' own attention (PyTorch SDPA or eager) with the
            engine's explicit masks; ``"flash_attn"``: flash-attn's ``flash_attn_with_kvcache``
            over heads-last caches with per-row ``cache_seqlens`` (fp16/bf16 models on CUDA,
            flash-attn installed; see :mod:`speccascade_fast.attention`).
        draft_confidence: None, or a number in (0, 1): each row stops drafting after its first
            draft whose drafter probability is below it (or at ``gamma`` drafts, an EOS draft,
            its budget), as in :func:`speccascade_fast.generate`. The block's drafter steps
            end when every row has stopped; each row is verified on its own drafts (the ragged
            verification), so its tokens still do not depend on the batch. One host read per
            drafter step.
        gamma_policy, exact_prefix, divergence_budget: as in
            :func:`speccascade_fast.generate` (each block's number of drafts; the first tokens
            verified losslessly; the total variation each response may spend).
        calibration: a calibration file (``speccascade calibrate``) in place of ``rule`` and
            ``alpha``, as in :func:`speccascade_fast.generate`.
        config: the decoding settings as one :class:`~speccascade_fast.config.DecodeConfig`
            instead of the keyword arguments ``method`` .. ``calibration`` (which must then
            keep their defaults).

    Example:
        >>> engine = Engine(drafter, verifier, max_batch_size=4, max_seq_len=1024,
        ...                 rule="token_v3", alpha=0.3, gamma=5, temperature=0)
        >>> out = engine.generate(ids, attention_mask=mask, max_new_tokens=128, seed=[1, 2, 3, 4])
    """

    def __init__(self, drafter, verifier, *, max_batch_size: int = 1,
                 max_seq_len: int | None = None, method: str = "spec_cascade",
                 rule: str | None = None, alpha: float | None = None, gamma: int = 5,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, bonus: str = "cascade", backend: str = "auto",
                 compile_drafter: bool = False, cuda_graphs: bool | None = None,
                 attention: str | None = None, draft_confidence: float | None = None,
                 gamma_policy="fixed",
                 exact_prefix: int = 0, divergence_budget: float | None = None,
                 calibration=None, config: DecodeConfig | None = None):
        decoding = dict(method=method, rule=rule, alpha=alpha, gamma=gamma,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        bonus=bonus, backend=backend, draft_confidence=draft_confidence,
                        gamma_policy=gamma_policy, exact_prefix=exact_prefix,
                        divergence_budget=divergence_budget, calibration=calibration)
        if config is None:
            config = DecodeConfig(**decoding)
        elif not isinstance(config, DecodeConfig):
            raise ValueError(f"config must be a DecodeConfig, got {type(config).__name__}")
        else:
            given = [k for k, v in decoding.items() if v != _DECODING_DEFAULTS[k]]
            if given:
                raise ValueError(f"pass the decoding settings either as config= or as keyword "
                                 f"arguments, not both (also given: {', '.join(given)})")
        if config.logits_processor is not None:
            raise ValueError("the Engine does not run a logits_processor; "
                             "speccascade_fast.generate runs it on the sequential loops")
        if config.method not in METHODS:
            raise ValueError(f"method={config.method!r} does not run on the Engine; it runs "
                             f"{', '.join(METHODS)} (use speccascade_fast.generate for the rest)")
        self.cfg = config
        drafter, verifier = model_facts.check_pair(
            config.method, model_facts.loaded(drafter), model_facts.loaded(verifier))
        models = [m for m in (drafter, verifier) if m is not None]
        check_backend(attention, models)
        for m in models:
            why = unsupported_reason(m, attention)
            if why is not None:
                raise ValueError(f"{type(m).__name__}: {why}")
        if not isinstance(compile_drafter, bool):
            raise ValueError(f"compile_drafter must be True or False, got {compile_drafter!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) \
                or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        limits = [c for c in map(model_facts.context, models) if c is not None]
        if max_seq_len is None:
            max_seq_len = min([DEFAULT_MAX_SEQ_LEN, *limits])
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        if limits and max_seq_len > min(limits):
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the models' context of "
                             f"{min(limits)} tokens (max_position_embeddings)")
        self.drafter, self.verifier = drafter, verifier
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        # slot i holds position i; past max_seq_len: the last block's drafts, then the trash slot
        self.slots = max_seq_len + self.cfg.gamma + 2
        self.attention = attention
        self.q = (SlotModel(drafter, max_batch_size, self.slots, compile_steps=compile_drafter,
                            attention=attention) if drafter is not None else None)
        self.p = (SlotModel(verifier, max_batch_size, self.slots, attention=attention)
                  if verifier is not None else None)
        self.device = model_facts.device(models[0])
        self.cuda_graphs = self._graphs_setting(cuda_graphs, compile_drafter)
        # graphs need fixed shapes: every call then attends over the whole cache (stale slots
        # masked) instead of the block's longest prefix
        self._full_kv = self.cuda_graphs
        self._graphs = Graphs() if self.cuda_graphs else None
        self._backend = None  # the verification backend's name, resolved on first use
        self._verify = None  # and its function
        self._draft_confidence = (DraftConfidenceBlocks(self)
                                  if self.cfg.draft_confidence is not None else None)
        adaptive = self.cfg.gamma_policy in ("goodput", "goodput_confidence")
        self._goodput = (Goodput(self.cfg.gamma, allow_zero=self.cfg.min_gamma == 0)
                         if adaptive else None)
        #: the drafter's prefill waits for the call's first drafting block where the controller
        #: may choose plain verifier steps throughout (a batch that never drafts never pays it)
        self._lazy_drafter = self._goodput is not None and self._goodput.g_min == 0
        self._drafter_behind = False  # this call's drafter prefill is still to come
        self._late_prefill_s = 0.0  # and the seconds it took when it came
        #: the drafter-confidence acceptance predictor, and how each predictor scored
        self._confidence = (ConfidenceAcceptance()
                            if self.cfg.gamma_policy == "goodput_confidence" else None)
        self._acceptance_log = AcceptanceLog()
        self._predicted: dict[str, list[float]] = {}  # the last block's predictions per row
        self._gammas: list[int] = []  # the gamma of each block of the current call
        self._indices: dict = {}  # row-index tensors of mixed-rule verifications

    def _graphs_setting(self, cuda_graphs, compile_drafter) -> bool:
        on_cuda = self.device is not None and self.device.type == "cuda"
        if cuda_graphs is None:
            return on_cuda and not compile_drafter
        if not isinstance(cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be None, True or False, got {cuda_graphs!r}")
        if cuda_graphs and compile_drafter:
            raise ValueError("cuda_graphs=True and compile_drafter=True are alternatives "
                             "(the graphs already replay the drafter's steps); choose one")
        if cuda_graphs and not on_cuda:
            raise ValueError(f"cuda_graphs=True needs the models on a CUDA device; they are on "
                             f"{self.device}")
        return cuda_graphs

    # --- the public call ------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 64, seed=0,
                 temperature=None, alpha=None, eos_token_id=None,
                 pad_token_id: int | None = None, on_tokens=None, stop_condition=None,
                 rule=None, exact_prefix=None, divergence_budget=None) -> GenerateOutput:
        """Decode a batch; returns :class:`~speccascade_fast.outputs.GenerateOutput`.

        ``input_ids`` ``[B, P]`` (left or right padded, with ``attention_mask``), ``B <=
        max_batch_size``; ``seed``: int (sequence b uses ``seed + b``) or B ints;
        ``temperature`` / ``alpha``: None (the engine's), a number, or B numbers (one per
        sequence); ``max_new_tokens`` (an int or B ints), ``eos_token_id``, ``pad_token_id``,
        ``on_tokens``, ``stop_condition``: as in :func:`speccascade_fast.generate`. Prompt +
        ``max_new_tokens`` must fit ``max_seq_len``.

        ``spec_cascade`` rows may differ in ``rule`` (None: the engine's, a name, or B names),
        ``alpha`` (None: the engine's alpha for the engine's rule, else each rule's default) and
        ``exact_prefix`` (None: the engine's, an int or B ints: the first tokens verified
        losslessly) and ``divergence_budget`` (None: the engine's, a number >= 0 or B numbers,
        ``inf`` for no budget: the total variation each response may spend, its spending in
        ``stats["per_sequence"][b]["divergence_spent"]``); a row's tokens do not depend on the
        rules of the rows beside it.
        """
        start = time.perf_counter()
        cfg = self.cfg
        hooks = outputs.Hooks(on_tokens, stop_condition)
        prompts, input_ids = inputs.prompts(input_ids, attention_mask)
        B = len(prompts)
        if B > self.max_batch_size:
            raise ValueError(f"input_ids has {B} sequences but max_batch_size="
                             f"{self.max_batch_size}")
        budgets = inputs.budgets(max_new_tokens, B)
        main = self.verifier if self.verifier is not None else self.drafter
        eos = inputs.eos_ids(eos_token_id, self.verifier, self.drafter)
        pad = inputs.pad_id(pad_token_id, main, eos)
        inputs.check_vocab(prompts, eos, pad, model_facts.vocab_size(main))
        for b, (prompt, n) in enumerate(zip(prompts, budgets)):
            if prompt.numel() + n > self.max_seq_len:
                raise ValueError(f"sequence {b}: prompt ({prompt.numel()} tokens) + "
                                 f"max_new_tokens ({n}) exceeds max_seq_len={self.max_seq_len}")
        if cfg.method == "spec_cascade":
            rules, alphas, exact = inputs.per_sequence_rules(rule, alpha, exact_prefix, cfg, B,
                                                             self.device)
            spend = inputs.divergence_budgets(divergence_budget, cfg.divergence_budget, B)
            if self._draft_confidence is not None and (set(rules) != {cfg.rule} or any(exact)
                                                       or spend is not None):
                raise ValueError("rule, exact_prefix and divergence_budget per call do not "
                                 "combine with draft_confidence (a cut block is verified with "
                                 "the engine's rule)")
        else:
            for name, value in (("rule", rule), ("exact_prefix", exact_prefix), ("alpha", alpha),
                                ("divergence_budget", divergence_budget)):
                if value is not None:
                    raise ValueError(f"{name} applies to method='spec_cascade' only")
            rules, exact, spend = [None] * B, [0] * B, None
            alphas = inputs.per_sequence("alpha", alpha, cfg.alpha, B, cfg.rule, self.device)
        temperatures = inputs.per_sequence("temperature", temperature, cfg.temperature, B,
                                           cfg.rule, self.device)
        settings, row_settings = self._call_settings(rules, alphas, temperatures, exact, spend)
        rows = Rows(self, prompts, inputs.seeds(seed, B), temperatures, alphas, budgets, eos,
                    hooks, rules, exact, spend)
        self._gammas = []
        self._acceptance_log = AcceptanceLog()
        if self._confidence is not None:
            self._confidence.new_call()
        if self._goodput is not None:
            self._goodput.new_call()
        self._drafter_behind = self._lazy_drafter
        self._late_prefill_s = 0.0
        with torch.inference_mode():
            prefill_start = time.perf_counter()
            shared = rows.prefill(drafter=not self._lazy_drafter)
            if self.device is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # prefill_s is the prefill's device time
            prefill_s = time.perf_counter() - prefill_start
            while rows.size:
                if cfg.method == "spec_cascade":
                    self._block(rows)
                elif cfg.method == "autoregressive":
                    self._step(rows, self.p, deferred=True)
                else:
                    self._step(rows, self.q, deferred=False)
                rows.drop_finished()
        sequences = outputs.sequences(input_ids.to(self.device), rows.new_tokens, pad)
        extra = {"gammas": self._gammas} if cfg.gamma_policy != "fixed" else {}
        if self._goodput is not None:
            extra["acceptance_log_loss"] = self._acceptance_log.summary()
        stats = outputs.final_stats(rows.counters, settings, start, row_settings,
                                    prefill_s=prefill_s + self._late_prefill_s,
                                    shared_prefix_tokens=shared,
                                    prefix_reused_tokens=min(rows.reused, default=0), **extra)
        return GenerateOutput(sequences, stats, rows.new_tokens)

    def _call_settings(self, rules, alphas, temperatures, exact, spend):
        """The settings this call used, for its statistics: the config's, with what the call
        set per sequence in place (one value, or one per sequence where they differ), and each
        sequence's own (:func:`outputs.call_settings`)."""
        cfg = self.cfg
        alpha = None if alphas is None else alphas.tolist()
        if cfg.method == "spec_cascade":  # a rule without alpha reads zeros; report None
            alpha = [a if ALPHA_RANGES[r] is not None else None for r, a in zip(rules, alpha)]
            return outputs.call_settings(cfg.settings(), rule=rules, alpha=alpha,
                                         temperature=temperatures.tolist(), exact_prefix=exact,
                                         divergence_budget=spend)
        return outputs.call_settings(cfg.settings(), alpha=alpha,
                                     temperature=temperatures.tolist())

    # --- Algorithm 4, for every unfinished row ---------------------------------------------------
    # Each step or block is a body of device work on fixed shapes (no host reads, so it can be
    # replayed as a CUDA graph) between host bookkeeping; the body ends with one packed tensor
    # (:mod:`.pack`) that the host reads once. Before the first block both models hold every
    # row's prompt but its last token (Rows.prefill; a deferred drafter is fed it, and what
    # plain steps emitted, before its first drafting block), so in every block the verifier feeds
    # gamma + 1 tokens per row and the drafter's first call 1 or 2 (2 after a block that accepted
    # all gamma drafts with no bonus drafter step): the shapes never depend on the prompts.
    def _block(self, rows: Rows) -> None:
        """Draft, score, verify, accept (Algorithm 4) for every unfinished row, then emit."""
        q, p = self.q, self.p
        start, batch = time.perf_counter(), rows.size
        rules = rows.block_rules()
        # what the lagging drafter must be fed before it drafts (the controller prices it)
        lag = self._drafter_lag(rows) if self._goodput is not None else 0
        gamma = self._gamma(rows, rules, lag)
        if gamma == 0:  # a plain verifier step: a block whose only position is its bonus
            self._step(rows, p, deferred=True)
            for b in range(rows.size):
                rows.stats(b).add_block(0, 0)
            self._observe(batch, 0, start)
            return
        caught_up = time.perf_counter()
        if self._catch_up_drafter(rows):  # a switching cost, not the block's time
            if self._goodput is not None and self.device is not None \
                    and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # its device time too
            took = time.perf_counter() - caught_up
            start += took
            if self._goodput is not None:
                self._goodput.observe_catch_up(lag, took, prefill=self._drafter_behind)
            if self._drafter_behind:  # the call's drafter prefill, deferred to here
                self._late_prefill_s += took
        self._drafter_behind = False
        L = list(rows.length)  # emit() advances rows.length
        width = max(n - s for n, s in zip(L, q.seen))
        if self._draft_confidence is None:
            results, calls = self._fixed_block(rows, width, gamma, rules)
        else:
            results, calls = self._draft_confidence(rows, width)
        for b, r in enumerate(results):
            s = rows.stats(b)
            if self._goodput is not None:  # score the predictions (before this block counts)
                self._acceptance_log.add({k: v[b] for k, v in self._predicted.items()},
                                         r.drafted, r.accepted)
            if self._confidence is not None:
                self._confidence.observe(rows.index[b], r.confidence, r.drafted, r.accepted)
            s.verifier_calls += 1
            s.drafter_calls += calls
            s.add_block(r.drafted, r.accepted)
            kept = rows.emit(b, r.tokens, r.deferred)
            if r.spent is not None:  # the charges of the positions it emitted
                s.divergence_spent += sum(r.spent[:kept])
            # the caches now hold: the drafter every token it was fed (the row's last one, then
            # all drafts but the last, and the last too if the bonus step ran: one per drafter
            # call), the verifier the whole block; valid up to the last accepted draft
            q.seen[b] = min(L[b] + calls - 1, L[b] + r.accepted)
            p.seen[b] = L[b] + r.accepted
        self._observe(batch, gamma, start)

    def _gamma(self, rows: Rows, rules: tuple, lag: int) -> int:
        """This block's number of drafts, by the config's ``gamma_policy`` (recorded). 0 (a plain
        verifier step) only where every row's rule allows it (:attr:`DecodeConfig.min_gamma`).
        ``lag``: :meth:`_drafter_lag` now, for the goodput controller."""
        cfg, policy = self.cfg, self.cfg.gamma_policy
        if policy == "fixed":
            return cfg.gamma
        min_gamma = 0 if all(r == "spec" or cfg.bonus == "verifier" for r in rules) else 1
        if self._goodput is not None:
            predicted = {"counts": [acceptance(rows.stats(b).accepted, rows.stats(b).rejected)
                                    for b in range(rows.size)]}
            if self._confidence is not None:
                predicted["confidence"] = [self._confidence.predict(seq) for seq in rows.index]
            self._predicted = predicted
            remaining = sum(rows.remaining(b) for b in range(rows.size)) / rows.size
            gamma = self._goodput.choose(rows.size, predicted["confidence" if policy ==
                                                              "goodput_confidence" else "counts"],
                                         min_gamma, remaining=remaining,
                                         catch_up=self._goodput.catch_up(
                                             lag, self._drafter_behind))
        else:
            gamma = policy(len(self._gammas), rows.size)
            if isinstance(gamma, bool) or not isinstance(gamma, int) \
                    or not min_gamma <= gamma <= cfg.gamma:
                raise ValueError(f"gamma_policy returned {gamma!r}; a block's gamma must be an "
                                 f"int in [{min_gamma}, {cfg.gamma}] (gamma is the most)")
        self._gammas.append(gamma)
        return gamma

    def _observe(self, batch: int, gamma: int, start: float) -> None:
        if self._goodput is not None:
            self._goodput.observe(batch, gamma, time.perf_counter() - start)

    def _drafter_lags(self, rows: Rows) -> bool:
        """Whether the drafter must be fed before a block: its prefill is still to come, or
        some row is more tokens ahead of it than a block's first drafter call feeds (2)."""
        return self._drafter_behind or any(n - s > 2 for n, s in zip(rows.length, self.q.seen))

    def _drafter_lag(self, rows: Rows) -> int:
        """The tokens :meth:`_catch_up_drafter` would feed now: rows times the longest row's
        count (the call is left-padded), and a deferred prefill's shared prefix once."""
        if not self._drafter_lags(rows):
            return 0
        if not self._drafter_behind:
            return rows.size * max(n - 1 - s for n, s in zip(rows.length, self.q.seen))
        return rows.shared + rows.size * max(n - 1 - rows.shared for n in rows.length)

    def _catch_up_drafter(self, rows: Rows) -> bool:
        """After plain verifier steps (gamma = 0) the drafter lags; feed it every row's tokens
        but the last in one call, so that a block's first drafter call feeds at most 2. Where
        the call's drafter prefill was deferred (:attr:`_lazy_drafter`), this call is it, and
        like an eager prefill it is not counted among the drafter's calls.
        Returns whether it fed anything."""
        q = self.q
        upto = [n - 1 for n in rows.length]
        if not self._drafter_lags(rows):
            return False
        for b in range(rows.size):
            if upto[b] > q.seen[b] and not self._drafter_behind:
                rows.stats(b).drafter_calls += 1
        tokens = rows.tokens()
        if self._drafter_behind and rows.shared:  # the prefix every prompt starts with, once
            rows.reused.append(q.prefill_shared(tokens, rows.shared))
        q.prefill(tokens, [max(u, s) for u, s in zip(upto, q.seen)])
        return True

    def _fixed_block(self, rows: Rows, width: int, gamma: int, rules: tuple):
        """The block on fixed shapes (every row drafts gamma tokens), as one body of device work
        with one host read: eager, or replayed as a CUDA graph. Returns per row a
        :class:`BlockResult` and the number of drafter calls.

        With ``bonus="cascade"`` the graph runs the bonus drafter step in every block; eagerly it
        runs after the host read, only if a row accepted all its drafts and keeps a bonus token,
        followed by a second verification (same keys: same decisions, the bonus from the
        cascade's target) and a second read."""
        q, p = self.q, self.p
        n = self._bucket(rows.size)
        budget = rows.budget_left(n)  # None without a divergence budget
        layout = block_layout(gamma, budget is not None, self._confidence is not None)
        kv, greedy = self._kv(rows), rows.greedy
        in_body = self._graphs is not None and any(map(self._bonus_step, rules))

        def body(ints, seeds, temperature, alpha, budget=None):
            t = ints[:, 0]
            ids = ints[:, 1 + width:]
            # draft: gamma drafter steps, each followed by a draw x ~ qT
            logits = q.forward(ids, ints[:, 1: 1 + width], kv(0), 1)[:, 0]
            q_rows, drafts = [logits], [self._draw(logits, seeds, temperature, t, greedy)]
            for j in range(1, gamma):
                logits = q.forward(drafts[-1][:, None], (t + j - 1)[:, None], kv(j), 1)[:, 0]
                q_rows.append(logits)
                drafts.append(self._draw(logits, seeds, temperature, t + j, greedy))
            if in_body:
                q_rows.append(q.forward(drafts[-1][:, None], (t + gamma - 1)[:, None],
                                        kv(gamma), 1)[:, 0])
            drafts = torch.stack(drafts, dim=1)
            # score: one verifier call over the row's last token and its gamma drafts
            slots = (t - 1)[:, None] + torch.arange(gamma + 1, device=t.device)
            p_logits = p.forward(torch.cat([ids[:, -1:], drafts], dim=1), slots, kv(gamma),
                                 gamma + 1)
            q_logits = torch.stack(q_rows, dim=1)
            # verify
            pack = self._verified(q_logits, drafts, p_logits, seeds, temperature, alpha, t,
                                  padded_rules, budget)
            return pack, q_logits, p_logits

        per_row = rows.padded(n)  # seeds, temperature, alpha
        padded_rules = rules + rules[:1] * (n - rows.size)
        ints = self._inputs(rows, q, width, n)
        key = ("block", n, width, gamma, padded_rules, budget is not None, greedy)
        more = () if budget is None else (budget,)
        pack, q_logits, p_logits = self._run(key, body, (ints, *per_row, *more))
        host = layout.unpack(pack, rows.size)  # accept: the block's one device-to-host read
        self._check_logits([r.q_nonfinite for r in host], ("drafter logits", q_logits))
        self._check_logits([r.p_nonfinite for r in host], ("verifier logits", p_logits))
        # what the sequential engine would have verified: drafts up to the first EOS draft and
        # the budget (later ones exist only because block shapes are fixed)
        g = [min(gamma, rows.remaining(b),
                 next((i + 1 for i, d in enumerate(r.drafts) if d in rows.eos), gamma))
             for b, r in enumerate(host)]
        calls = gamma + in_body
        if not in_body and any(self._needs_bonus(rows, b, r.accepted, r.drafts[: g[b]],
                                                 rules[b]) for b, r in enumerate(host)):
            # bonus: q at the bonus position, then the same verification with the cascade's bonus
            t, draft_ids = ints[:, 0], layout.get(pack, "drafts")
            bonus = q.forward(draft_ids[:, -1:], (t + gamma - 1)[:, None], kv(gamma), 1)[:, 0]
            q_logits = torch.cat([q_logits, bonus[:, None]], dim=1)
            confidence = (layout.get(pack, "confidence") if self._confidence is not None
                          else None)
            host = layout.unpack(self._verified(q_logits, draft_ids, p_logits, *per_row, t,
                                                padded_rules, budget, confidence),
                                 rows.size)  # the second read
            self._check_logits([r.q_nonfinite for r in host], ("drafter logits", q_logits))
            calls += 1
        return [BlockResult(r.accepted, r.tokens[: 1 + r.accepted], r.deferred, g[b],
                            getattr(r, "spent", None), getattr(r, "confidence", None))
                for b, r in enumerate(host)], calls

    def _verified(self, q_logits, drafts, p_logits, seeds, temperature, alpha, t, rules,
                  budget=None, confidence=None):
        """The fused verification of a fixed block, packed for its host read
        (:func:`block_layout`). ``q_logits`` has ``gamma + 1`` rows (the bonus from the
        cascade's target) or ``gamma`` (from pT); ``budget``: None or each row's divergence
        budget left (float64); ``confidence``: the drafts' confidences if an earlier
        verification of the block computed them (the goodput controller's predictor). Rows
        whose ``rules`` differ are verified in one call per rule (rows gathered by index,
        results scattered back)."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(rules):
            groups.setdefault(r, []).append(i)
        per_row = (seeds, temperature, alpha, t) + (() if budget is None else (budget,))
        if len(groups) == 1:
            out = self._verify_rule(rules[0], q_logits, drafts, p_logits, *per_row)
            accepted, tokens, deferred, spent = out.num_accepted, out.tokens, out.deferred, \
                out.spent
        else:
            n, g = drafts.shape
            accepted = torch.zeros(n, dtype=torch.int64, device=drafts.device)
            tokens = torch.zeros(n, g + 1, dtype=torch.int64, device=drafts.device)
            deferred = torch.zeros(n, g + 1, dtype=torch.bool, device=drafts.device)
            spent = (None if budget is None
                     else torch.zeros(n, g + 1, dtype=torch.float64, device=drafts.device))
            for rule, idx in groups.items():
                ix = self._index(idx, drafts.device)
                out = self._verify_rule(rule, *(x.index_select(0, ix) for x in (
                    q_logits, drafts, p_logits, *per_row)))
                accepted.index_copy_(0, ix, out.num_accepted)
                tokens.index_copy_(0, ix, out.tokens)
                deferred.index_copy_(0, ix, out.deferred)
                if spent is not None:
                    spent.index_copy_(0, ix, out.spent)
        more = {} if budget is None else {"spent": spent}
        if self._confidence is not None:
            more["confidence"] = (max_probability(q_logits[:, : drafts.shape[1]], temperature)
                                  if confidence is None else confidence)
        return block_layout(drafts.shape[1], budget is not None,
                            self._confidence is not None).pack(
            accepted=accepted, tokens=tokens, drafts=drafts, deferred=deferred,
            q_nonfinite=nonfinite(q_logits), p_nonfinite=nonfinite(p_logits), **more)

    def _verify_rule(self, rule, q_logits, drafts, p_logits, seeds, temperature, alpha, t,
                     budget=None):
        cfg = self.cfg
        if self._verify is None:
            self._verify = backends.get(cfg.backend, self.device)
        if rule == "spec":  # its bonus law is pT whatever q is: the same tokens without q there
            q_logits = q_logits[:, : drafts.shape[1]]
        return self._verify(q_logits, drafts, p_logits, rule=rule, alpha=alpha,
                            temperature=temperature,
                            top_k=checks.top_k(cfg.top_k, p_logits.shape[-1]), top_p=cfg.top_p,
                            seed=seeds, positions=t, **({} if budget is None
                                                        else {"budget": budget}))

    def _index(self, rows: list[int], device) -> torch.Tensor:
        """The int64 index tensor of ``rows``, made once (a CUDA graph's capture then finds the
        tensor its warm-up made instead of copying from the host)."""
        key = (tuple(rows), device)
        ix = self._indices.get(key)
        if ix is None:
            ix = self._indices[key] = torch.tensor(rows, dtype=torch.int64, device=device)
        return ix

    def _bonus_step(self, rule: str) -> bool:
        """Whether a block of ``rule`` needs q at the bonus position (``bonus="cascade"``, a rule
        other than ``spec``, whose bonus law is pT whatever q is)."""
        return self.cfg.bonus == "cascade" and rule != "spec"

    def _needs_bonus(self, rows: Rows, b: int, accepted: int, drafts: list[int],
                     rule: str) -> bool:
        """Whether an eager block runs its bonus drafter step for row b, after the verification:
        when its rule needs q there (:meth:`_bonus_step`), the row accepted all of ``drafts``
        (those it is verified on) and a bonus token after them would be emitted. (Inside a CUDA
        graph the step runs in every block instead: one host read per block.)"""
        return (self._bonus_step(rule) and accepted >= len(drafts)
                and bonus_keepable(drafts, rows.remaining(b), rows.eos))

    def _step(self, rows: Rows, m: SlotModel, *, deferred: bool) -> None:
        """Autoregressive decoding with one model: one token per row."""
        kv, greedy = self._kv(rows), rows.greedy

        def body(ints, seeds, temperature):
            t = ints[:, 0]
            logits = m.forward(ints[:, 2:], ints[:, 1:2], kv(0), 1)[:, 0]
            x = self._draw(logits, seeds, temperature, t, greedy)
            return STEP.pack(token=x, nonfinite=nonfinite(logits)), logits

        n = self._bucket(rows.size)
        seeds, temperature, _ = rows.padded(n)
        ints = self._inputs(rows, m, 1, n)
        pack, logits = self._run(("step", deferred, n, greedy), body, (ints, seeds, temperature))
        host = STEP.unpack(pack, rows.size)  # the step's one device-to-host read
        name = "verifier logits" if deferred else "drafter logits"
        self._check_logits([r.nonfinite for r in host], (name, logits))
        for b, r in enumerate(host):
            rows.stats(b).verifier_calls += int(deferred)
            rows.stats(b).drafter_calls += int(not deferred)
            m.seen[b] = rows.length[b]
            rows.emit(b, [r.token], [deferred])

    # --- the plumbing of a body: inputs, graphs, batch buckets, draws, checks -------------------
    def _run(self, key, body, inputs):
        """``body(*inputs)``: eagerly, or replayed as this key's CUDA graph."""
        if self._graphs is None:
            return body(*inputs)
        return self._graphs(key, body, inputs)

    def _kv(self, rows: Rows):
        """Slots an attention call reads when its deepest query sits ``j`` past the block's
        first draft position: the fewest needed (eager), or the whole cache (fixed shapes)."""
        if self._full_kv:
            full = self.slots - 1  # everything but the trash slot
            return lambda j: full
        longest = max(rows.length)
        return lambda j: longest + j

    def _draw(self, logits, seeds, temperature, positions, greedy):
        cfg = self.cfg
        return draw(logits, temperature, seeds, positions,
                    checks.top_k(cfg.top_k, logits.shape[-1]), cfg.top_p, greedy=greedy,
                    min_p=cfg.min_p)

    def _inputs(self, rows: Rows, m: SlotModel, width: int, n: int) -> torch.Tensor:
        """int64 ``[n, 1 + 2 width]``, per row: the position L of the token to draw, then the
        slots and ids of the first call of ``m`` (the row's last ``L - seen`` tokens, at most
        ``width``, right-aligned; padding goes to the trash slot), the rows past the batch's
        repeating row 0 (:meth:`_bucket`): the block's one host-to-device copy."""
        trash, out = self.slots - 1, []
        for b, L in enumerate(rows.length):
            count = L - m.seen[b]
            slots = [L - width + i if i >= width - count else trash for i in range(width)]
            out.append([L, *slots, *rows.tail[b][2 - width:]])
        out += out[:1] * (n - len(out))
        return torch.tensor(out, dtype=torch.int64, device=self.device)

    def _bucket(self, B: int) -> int:
        """The rows a body runs for a batch of B: B when eager; with CUDA graphs the smallest
        power of two >= B (at most ``max_batch_size``), so that a batch whose rows finish one
        by one replays the graphs of a few sizes instead of capturing new ones at every size.
        The rows past B repeat row 0's inputs (:meth:`_inputs`, :meth:`Rows.padded`) into
        cache rows no sequence holds; nothing reads their outputs."""
        if self._graphs is None:
            return B
        return min(1 << (B - 1).bit_length(), self.max_batch_size)

    def _check_logits(self, host_bad, *named) -> None:
        """A row of the block read NaN/+inf or all--inf logits: the checks' own message."""
        if any(host_bad):
            for name, logits in named:
                checks.logits(name, logits)
            raise ValueError("non-finite logits in the block")  # unreachable: one check fires


#: the shortest prefix common to every prompt of a call that is fed once and copied to every
#: row (shorter ones are not worth a second forward call)
MIN_SHARED_PREFIX = 16


def shared_prefix(prompts: list[torch.Tensor], limit: int) -> int:
    """The length of the longest token prefix every prompt starts with, at most ``limit``."""
    first = prompts[0][:limit]
    n = first.numel()
    for p in prompts[1:]:
        m = min(n, p.numel())
        differ = (p[:m] != first[:m]).nonzero()
        n = int(differ[0]) if differ.numel() else m
    return n


class Rows:
    """The unfinished sequences of one ``generate`` call (row i of every tensor and list is the
    same sequence; finished ones are dropped) and the outputs of all of them."""

    def __init__(self, engine: Engine, prompts, seeds, temperature, alpha, budget, eos,
                 hooks: outputs.Hooks = outputs.NO_HOOKS, rules=None, exact=None, spend=None):
        B, device = len(prompts), engine.device
        self.engine = engine
        self.rules = list(rules) if rules is not None else [engine.cfg.rule] * B
        self.exact = list(exact) if exact is not None else [0] * B
        #: None, or per sequence the divergence budget (inf: none)
        self.spend = None if spend is None else list(spend)
        self.eos = eos
        self.hooks = hooks
        self.budget = budget
        self.prompts = prompts
        self.length = [p.numel() for p in prompts]
        # per row its last two tokens (the most a block's first drafter call feeds)
        self.tail = [[0, *p.tolist()][-2:] for p in prompts]
        self.seeds = torch.tensor(seeds, dtype=torch.int64, device=device)
        self.temperature = temperature
        # rules without alpha read zeros (the backends take a tensor either way)
        self.alpha = alpha if alpha is not None else torch.zeros(B, dtype=torch.float64,
                                                                 device=device)
        self.greedy = not bool(temperature.any())  # every row greedy: draws skip the noise
        self.index = list(range(B))  # row -> sequence
        self.new_tokens: list[list[int]] = [[] for _ in range(B)]
        self.counters = [Counters(sequences=1) for _ in range(B)]  # per sequence
        self.done = [False] * B
        self.shared, self.reused = 0, []  # (set by prefill)
        self._padded = None  # (n, seeds, temperature, alpha) of padded(n)
        for m in (engine.q, engine.p):
            if m is not None:
                m.seen = [0] * B

    @property
    def size(self) -> int:
        return len(self.index)

    def padded(self, n: int):
        """``(seeds, temperature, alpha)`` for ``n >= size`` rows, the rows past the batch
        repeating row 0's (:meth:`Engine._bucket`); the batch's own tensors when ``n == size``.
        Kept until the batch changes."""
        if n == self.size:
            return self.seeds, self.temperature, self.alpha
        if self._padded is None or self._padded[0] != n:
            idx = torch.tensor([*range(self.size), *[0] * (n - self.size)],
                               device=self.seeds.device)
            self._padded = (n, *(x.index_select(0, idx)
                                 for x in (self.seeds, self.temperature, self.alpha)))
        return self._padded[1:]

    def prefill(self, drafter: bool = True) -> int:
        """Both models (the verifier alone with ``drafter=False``) take every row's prompt
        but its last token (which each block feeds). A prefix of at least
        :data:`MIN_SHARED_PREFIX` tokens that every row's prompt starts with is fed once and
        copied (:meth:`SlotModel.prefill_shared`, which reuses what an earlier call of this
        engine fed of it); returns its length (0: none), also kept in :attr:`shared`, and
        :attr:`reused` holds, per model that has taken it, how many of its tokens came from an
        earlier call."""
        tokens = torch.zeros(self.size, self.engine.slots, dtype=torch.int64,
                             device=self.engine.device)
        for b, prompt in enumerate(self.prompts):
            tokens[b, : prompt.numel()] = prompt.to(tokens.device)
        upto = [n - 1 for n in self.length]
        shared = shared_prefix(self.prompts, min(upto)) if self.size > 1 else 0
        if shared < MIN_SHARED_PREFIX:
            shared = 0
        self.shared, self.reused = shared, []
        for m in (self.engine.q if drafter else None, self.engine.p):
            if m is not None:
                if shared:
                    self.reused.append(m.prefill_shared(tokens, shared))
                m.prefill(tokens, upto)
        return shared

    def budget_left(self, n: int) -> torch.Tensor | None:
        """float64 ``[n]`` on the device: what each row may still spend of its divergence budget
        (rows past the batch repeat row 0's, :meth:`padded`); None without budgets."""
        if self.spend is None:
            return None
        left = [max(self.spend[seq] - self.counters[seq].divergence_spent, 0.0)
                for seq in self.index]
        left += left[:1] * (n - len(left))
        return torch.tensor(left, dtype=torch.float64, device=self.seeds.device)

    def block_rules(self) -> tuple:
        """Each row's rule for the next block: ``spec`` while the row is inside its exact
        prefix (fewer tokens emitted than ``exact_prefix``), else its own."""
        return tuple("spec" if len(self.new_tokens[seq]) < e else r
                     for seq, r, e in zip(self.index, self.rules, self.exact))

    def tokens(self) -> torch.Tensor:
        """int64 ``[rows, slots]``: each row's prompt and new tokens so far, zeros after."""
        out = torch.zeros(self.size, self.engine.slots, dtype=torch.int64)
        for b, seq in enumerate(self.index):
            row = self.prompts[seq].tolist() + self.new_tokens[seq]
            out[b, : len(row)] = torch.tensor(row, dtype=torch.int64)
        return out.to(self.engine.device)

    def stats(self, b: int) -> Counters:
        """Row b's sequence's counters."""
        return self.counters[self.index[b]]

    def remaining(self, b: int) -> int:
        seq = self.index[b]
        return self.budget[seq] - len(self.new_tokens[seq])

    def emit(self, b: int, tokens: list[int], deferred: list[bool]) -> int:
        """Row b emits ``tokens`` by the emit rule (up to its first EOS, the hooks' stop and its
        budget); returns how many it kept."""
        self.tail[b] = (self.tail[b] + tokens)[-2:]
        seq = self.index[b]
        kept, done = self.hooks.emit(seq, self.new_tokens[seq], tokens, self.remaining(b),
                                     self.eos)
        self.length[b] += len(kept)
        self.stats(b).add_emitted(kept, deferred)
        self.done[b] = self.done[b] or done
        return len(kept)

    def drop_finished(self) -> None:
        """Finished rows leave the batch (and the caches)."""
        if not any(self.done):
            return
        keep = [b for b in range(self.size) if not self.done[b]]
        index = torch.tensor(keep, dtype=torch.int64, device=self.seeds.device)
        for m in (self.engine.q, self.engine.p):
            if m is not None:
                m.keep_rows(index, keep)
        self._padded = None
        self.seeds = self.seeds.index_select(0, index)
        self.temperature = self.temperature.index_select(0, index)
        self.alpha = self.alpha.index_select(0, index)
        for name in ("length", "index", "done", "tail", "rules", "exact"):
            setattr(self, name, [getattr(self, name)[b] for b in keep])
