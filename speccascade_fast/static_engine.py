"""The batched engine: static position-indexed KV caches and ragged acceptance.

:class:`Engine` holds a drafter and a verifier (Hugging Face decoder-only models), one
:class:`~speccascade_fast.kv_cache.SlotCache` per model sized ``max_batch_size x max_seq_len``,
and the decoding settings; ``Engine.generate`` decodes a batch of prompts of different lengths.
:func:`speccascade_fast.generate` builds one for ``spec_cascade``, ``autoregressive`` and
``drafter_only`` on decoder-only models (the other methods, and encoder-decoder models, run on the
sequential loops of :mod:`speccascade_fast.engine`, which are also this engine's oracle).

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
row is verified on its own drafts in one ragged call (:func:`speccascade_fast.ragged.call`
with ``max_spec_len = S``: the flattened rows gathered on the device, padding after the last
row's). Each drafter step, and the verifier call with the verification, is a body of fixed
shapes: with ``cuda_graphs`` one graph per (batch-size bucket, first-call width or later step,
all-greedy) for the steps and one per (batch-size bucket, S) for the verification, replayed.
The steps write their logits and drafts into the engine's step buffers and hand the next step
its input, so between two steps the host only reads the step's packed result.

Finished rows (EOS or their budget) leave the batch at the end of the block: the caches are
compacted, so they stop costing work. Shapes are fixed per block (every row drafts gamma tokens,
even past its EOS or budget); tokens past a row's EOS or budget are never emitted, and since
every decision at a position depends only on earlier positions, a row's output is the sequential
engine's, token for token (same seeds, same positions), whatever batch it rides in.
"""
from __future__ import annotations

import time
import weakref

import torch

from . import backends, checks
from .attention import ATTENTION, attention_mask, check_backend, selected
from .engine import (
    GenerateOutput,
    _accepts,
    _assemble,
    _cache_kwarg,
    _check_models,
    _config,
    _context,
    _device,
    _eos_ids,
    _is_encoder_decoder,
    _loaded,
    _pad_id,
    _prompts,
    _seeds,
    bonus_keepable,
)
from .kv_cache import SlotCache
from .ragged import call as ragged_call
from .ragged import row_owners
from .rules import check_alpha
from .sampling import draft_probability, draw
from .stats import Counters

#: the methods the engine runs (the others run on the sequential loops)
METHODS = ("spec_cascade", "autoregressive", "drafter_only")
#: ``max_seq_len`` when none is given (capped by the models' context)
DEFAULT_MAX_SEQ_LEN = 2048


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
    if _is_encoder_decoder(model):
        return "encoder-decoder models run on the sequential engine"
    attn = getattr(model.config, "_attn_implementation", None) or "eager"
    if attention is None and attn not in ATTENTION:
        return (f"attn_implementation={attn!r} is not supported by the static engine "
                f"(use one of {', '.join(ATTENTION)})")
    if not (_accepts(model, "position_ids") and _cache_kwarg(model) is not None):
        return "the model's forward takes no position_ids / KV cache (cache or past_key_values)"
    return None


#: model -> its torch.compile'd callable, shared by every Engine (compiled code is reused)
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(model):
    """``torch.compile(model, dynamic=True)``, once per model: the sizes that change from step to
    step (batch rows, attended length) are symbolic, so decoding does not recompile per step."""
    fn = _COMPILED.get(model)
    if fn is None:
        fn = _COMPILED[model] = torch.compile(model, dynamic=True)
    return fn


class _SlotModel:
    """One model, its static cache, and per row the number of valid slots (``seen``, host ints).
    ``compile_steps``: one-token calls (the decode steps) run the model ``torch.compile``d; the
    longer calls stay eager. ``attention``: the engine's attention (None: the model's own)."""

    def __init__(self, model, max_batch_size: int, slots: int, compile_steps: bool = False,
                 attention: str | None = None):
        self.model = model
        self.step_model = compiled(model) if compile_steps else model
        self.config = model.config
        self.attention = attention
        self.attn = attention or getattr(model.config, "_attn_implementation", None) or "eager"
        self.dtype = next(model.parameters()).dtype
        self.cache = SlotCache(max_batch_size, slots, heads_last=attention == "flash_attn")
        self.keep_arg = _accepts(model, "logits_to_keep")
        self.cache_arg = _cache_kwarg(model)
        limit = _context(model)
        self.max_position = (limit - 1) if limit is not None else None
        self.seen: list[int] = []

    def forward(self, ids: torch.Tensor, slots: torch.Tensor, kv_len: int,
                keep: int) -> torch.Tensor:
        """Feed token ``ids[b, i]`` at position ``slots[b, i]`` and return the logits of the last
        ``keep`` columns, ``[B, keep, V]``; attention reads slots ``[0, kv_len)``. A row's real
        tokens are contiguous positions ending at its last column (padding before them goes to
        the trash slot). Device work only (no host reads), so it can run inside a CUDA graph."""
        self.cache.bind(slots, kv_len)
        mask = attention_mask(self.config, slots, kv_len, self.attn, self.dtype)
        positions = slots if self.max_position is None else slots.clamp(max=self.max_position)
        kwargs = {"logits_to_keep": keep} if self.keep_arg else {}
        fwd = self.step_model if ids.shape[1] == 1 else self.model
        with selected(self.config, self.attention):
            out = fwd(input_ids=ids, attention_mask=mask, position_ids=positions,
                      use_cache=True, **{self.cache_arg: self.cache}, **kwargs).logits
        return out if self.keep_arg else out[:, -keep:]

    def prefill(self, tokens: torch.Tensor, upto: list[int]) -> None:
        """Feed each row ``b`` its tokens ``tokens[b, seen_b : upto_b]`` (rows left-padded to
        one width, the padding written to the trash slot); the logits are not needed."""
        counts = [u - s for u, s in zip(upto, self.seen)]
        n = max(counts)
        if n > 0:
            device = tokens.device
            col = torch.arange(n, device=device)
            pad = n - torch.tensor(counts, device=device)[:, None]
            start = torch.tensor(self.seen, device=device)[:, None]
            slots = torch.where(col >= pad, start + col - pad, self.cache.trash_slot)
            self.forward(tokens.gather(1, slots), slots, max(upto), 1)
        self.seen = list(upto)

    def keep_rows(self, index: torch.Tensor, rows: list[int]) -> None:
        self.cache.keep_rows(index)
        self.seen = [self.seen[i] for i in rows]


class _Graphs:
    """CUDA graphs of the engine's per-block work, one per key (which body, batch-size bucket, width
    of the drafter's first call, all-greedy or not), sharing one memory pool.

    A key's first call runs the body once on a side stream (Triton compiles, cuBLAS picks its
    kernels), then captures it; that warm-up is this very block run once more than needed,
    harmless since a body's cache writes and draws are functions of its inputs alone. Every
    call copies the inputs into the graph's static input tensors and replays it; the outputs
    are the graph's static output tensors, valid until the next replay of *any* key: the pool
    is shared, so a graph captured later may hold its outputs where an earlier one keeps its
    intermediates (a caller reads or clones an output before it replays another graph)."""

    def __init__(self):
        self.graphs: dict = {}
        self.pool = None

    def __call__(self, key, body, inputs):
        entry = self.graphs.get(key)
        if entry is None:
            static = [x.clone() for x in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                body(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = body(*static)
            self.pool = graph.pool()
            entry = self.graphs[key] = (graph, static, outputs)
        graph, static, outputs = entry
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        return outputs


def _nonfinite(logits: torch.Tensor) -> torch.Tensor:
    """int64 ``[B]``: 1 where row b of ``[B, ..., V]`` logits has a NaN, a +inf, or a position
    where every logit is -inf (a row's max is finite iff none of these), on the device."""
    bad = ~torch.isfinite(logits.amax(-1))
    return bad.reshape(bad.shape[0], -1).any(-1).to(torch.int64)


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
        rule, alpha, gamma, temperature, top_k, top_p, bonus, backend: as in
            :func:`speccascade_fast.generate` (``temperature`` and ``alpha`` are defaults that
            ``generate`` may override per sequence).
        compile_drafter: run the drafter's one-token steps ``torch.compile``d (dynamic shapes;
            the first calls compile, later Engines on the same drafter reuse the code). The
            tokens are the eager ones up to floating-point near-ties (fused kernels round
            differently); exactness towards the target is untouched either way.
        cuda_graphs: capture each block (the gamma (+1) drafter steps with their draws, the
            verifier's block forward, the fused verification and the packing of the block's
            one host read) as one CUDA graph per (batch-size bucket: the next power of two,
            at most ``max_batch_size``; width of the drafter's first call; all-greedy or not),
            replayed (with ``draft_confidence``: a graph per drafter
            step and one for the verifier call with the verification, see the module
            docstring). None (default): on when the models are on a CUDA device and
            ``compile_drafter`` is off. With
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

    Example:
        >>> engine = Engine(drafter, verifier, max_batch_size=4, max_seq_len=1024,
        ...                 rule="token_v3", alpha=0.3, gamma=5, temperature=0)
        >>> out = engine.generate(ids, attention_mask=mask, max_new_tokens=128, seed=[1, 2, 3, 4])
    """

    def __init__(self, drafter, verifier, *, max_batch_size: int = 1,
                 max_seq_len: int | None = None, method: str = "spec_cascade",
                 rule: str | None = None, alpha: float | None = None, gamma: int = 5,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 bonus: str = "cascade", backend: str = "auto", compile_drafter: bool = False,
                 cuda_graphs: bool | None = None, attention: str | None = None,
                 draft_confidence: float | None = None):
        self.cfg = _config(method, rule, alpha, gamma, temperature, top_k, top_p, bonus, None,
                           "prob", backend, draft_confidence)
        if method not in METHODS:
            raise ValueError(f"method={method!r} does not run on the Engine; it runs "
                             f"{', '.join(METHODS)} (use speccascade_fast.generate for the rest)")
        drafter, verifier = _check_models(method, _loaded(drafter), _loaded(verifier))
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
        limits = [c for c in map(_context, models) if c is not None]
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
        self.q = (_SlotModel(drafter, max_batch_size, self.slots, compile_steps=compile_drafter,
                             attention=attention) if drafter is not None else None)
        self.p = (_SlotModel(verifier, max_batch_size, self.slots, attention=attention)
                  if verifier is not None else None)
        self.device = _device(models[0])
        self.cuda_graphs = self._graphs_setting(cuda_graphs, compile_drafter)
        # graphs need fixed shapes: every call then attends over the whole cache (stale slots
        # masked) instead of the block's longest prefix
        self._full_kv = self.cuda_graphs
        self._graphs = _Graphs() if self.cuda_graphs else None
        self._verify = None  # the verification backend's function, resolved on first use
        self._backend = None  # and its name (the ragged verification of cut blocks)
        self._step_buffers = None  # cut blocks: each drafter step's logits and draft (below)

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
                 pad_token_id: int | None = None) -> GenerateOutput:
        """Decode a batch; returns :class:`~speccascade_fast.engine.GenerateOutput`.

        ``input_ids`` ``[B, P]`` (left or right padded, with ``attention_mask``), ``B <=
        max_batch_size``; ``seed``: int (sequence b uses ``seed + b``) or B ints;
        ``temperature`` / ``alpha``: None (the engine's), a number, or B numbers (one per
        sequence); ``max_new_tokens``, ``eos_token_id``, ``pad_token_id``: as in
        :func:`speccascade_fast.generate`. Prompt + ``max_new_tokens`` must fit ``max_seq_len``.
        """
        start = time.perf_counter()
        cfg = self.cfg
        prompts, input_ids = _prompts(input_ids, attention_mask)
        B = len(prompts)
        if B > self.max_batch_size:
            raise ValueError(f"input_ids has {B} sequences but max_batch_size="
                             f"{self.max_batch_size}")
        budgets = _budgets(max_new_tokens, B)
        for b, (prompt, n) in enumerate(zip(prompts, budgets)):
            if prompt.numel() + n > self.max_seq_len:
                raise ValueError(f"sequence {b}: prompt ({prompt.numel()} tokens) + "
                                 f"max_new_tokens ({n}) exceeds max_seq_len={self.max_seq_len}")
        rows = _Rows(self, prompts, _seeds(seed, B), self._per_row("temperature", temperature, B),
                     self._per_row("alpha", alpha, B), budgets,
                     _eos_ids(eos_token_id, self.verifier, self.drafter))
        with torch.inference_mode():
            prefill_start = time.perf_counter()
            rows.prefill()
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
        main = self.verifier if self.verifier is not None else self.drafter
        pad = _pad_id(pad_token_id, main, rows.eos)
        sequences = _assemble(input_ids.to(self.device), None, rows.new_tokens, pad, False)
        total = Counters()
        for s in rows.counters:
            total += s
        stats = total.as_dict(time.perf_counter() - start)
        stats["prefill_s"] = prefill_s
        stats.update(method=cfg.method, rule=cfg.rule, alpha=cfg.alpha, gamma=cfg.gamma,
                     bonus=cfg.bonus, temperature=cfg.temperature,
                     draft_confidence=cfg.draft_confidence)
        return GenerateOutput(sequences, stats, rows.new_tokens)

    def _per_row(self, name, value, B) -> torch.Tensor | None:
        """float64 ``[B]`` from None (the engine's setting), a number or B numbers."""
        default = getattr(self.cfg, name)
        if name == "alpha" and self.cfg.rule is None:
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
            check_alpha(self.cfg.rule, t)
        elif not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {value!r}")
        return t.expand(B).clone().to(self.device)

    # --- one step / block for every unfinished row --------------------------------------------
    # Each block is a body of device work on fixed shapes (no host reads, so it can be replayed
    # as a CUDA graph) between host bookkeeping; the body returns one int64 tensor [B, k] that
    # the host reads once. Before the first block both models hold every row's prompt but its
    # last token (Rows.prefill), so in every block the verifier feeds gamma + 1 tokens per row
    # and the drafter's first call 1 or 2 (2 after a block that accepted all gamma drafts with
    # no bonus drafter step): the shapes never depend on the prompts.
    def _run(self, key, body, inputs):
        """``body(*inputs)``: eagerly, or replayed as this key's CUDA graph."""
        if self._graphs is None:
            return body(*inputs)
        return self._graphs(key, body, inputs)

    def _kv(self, rows: _Rows):
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
                    checks.top_k(cfg.top_k, logits.shape[-1]), cfg.top_p, greedy=greedy)

    def _inputs(self, rows: _Rows, m: _SlotModel, width: int, n: int) -> torch.Tensor:
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
        The rows past B repeat row 0's inputs (:meth:`_inputs`, :meth:`_Rows.padded`) into
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

    def _step(self, rows: _Rows, m: _SlotModel, *, deferred: bool) -> None:
        """Autoregressive decoding with one model: one token per row."""
        kv, greedy = self._kv(rows), rows.greedy

        def body(ints, seeds, temperature):
            t = ints[:, 0]
            logits = m.forward(ints[:, 2:], ints[:, 1:2], kv(0), 1)[:, 0]
            x = self._draw(logits, seeds, temperature, t, greedy)
            return torch.stack([x, _nonfinite(logits)], dim=1), logits

        n = self._bucket(rows.size)
        seeds, temperature, _ = rows.padded(n)
        ints = self._inputs(rows, m, 1, n)
        pack, logits = self._run(("step", deferred, n, greedy), body, (ints, seeds, temperature))
        host = pack.tolist()[: rows.size]  # the step's one device-to-host read
        name = "verifier logits" if deferred else "drafter logits"
        self._check_logits([r[1] for r in host], (name, logits))
        for b, (x, _) in enumerate(host):
            rows.stats(b).verifier_calls += int(deferred)
            rows.stats(b).drafter_calls += int(not deferred)
            m.seen[b] = rows.length[b]
            rows.emit(b, [x], [deferred])

    def _block(self, rows: _Rows) -> None:
        """Draft, score, verify, accept (Algorithm 4) for every unfinished row."""
        cfg, q, p = self.cfg, self.q, self.p
        L = list(rows.length)  # emit() advances rows.length
        width = max(n - s for n, s in zip(L, q.seen))
        if cfg.draft_confidence is None:
            results, calls = self._fixed_block(rows, width)
        else:
            results, calls = self._adaptive_block(rows, width)
        for b, (a, tokens, flags, g) in enumerate(results):
            s = rows.stats(b)
            s.blocks += 1
            s.verifier_calls += 1
            s.drafter_calls += calls
            s.drafted += g
            s.accepted += min(a, g)
            s.rejected += int(a < g)
            rows.emit(b, tokens, [bool(f) for f in flags])
            # the caches now hold: the drafter every token it was fed (the row's last one, then
            # all drafts but the last, and the last too if the bonus step ran: one per drafter
            # call), the verifier the whole block; valid up to the last accepted draft
            q.seen[b] = min(L[b] + calls - 1, L[b] + a)
            p.seen[b] = L[b] + a

    def _needs_bonus(self, rows: _Rows, b: int, accepted: int, drafts: list[int]) -> bool:
        """Whether an eager block runs its bonus drafter step for row b, after the verification:
        under ``bonus="cascade"`` (not ``spec``), when the row accepted all of ``drafts`` (those
        it is verified on) and a bonus token after them would be emitted. (Inside a CUDA graph
        the step runs in every block instead: one host read per block.)"""
        return (self.cfg.bonus_step and accepted >= len(drafts)
                and bonus_keepable(drafts, rows.remaining(b), rows.eos))

    def _verified(self, q_logits, drafts, p_logits, seeds, temperature, alpha, t):
        """The fused verification of a fixed block, packed for its host read: per row the
        accepted count, the gamma + 1 tokens, the gamma drafts, the gamma + 1 deferral flags and
        whether q / p read non-finite logits, int64 ``[B, 3 gamma + 5]``. ``q_logits`` has
        ``gamma + 1`` rows (the bonus from the cascade's target) or ``gamma`` (from pT)."""
        cfg = self.cfg
        out = self._verify(q_logits, drafts, p_logits, rule=cfg.rule, alpha=alpha,
                           temperature=temperature,
                           top_k=checks.top_k(cfg.top_k, p_logits.shape[-1]), top_p=cfg.top_p,
                           seed=seeds, positions=t)
        return torch.cat([out.num_accepted[:, None], out.tokens, drafts,
                          out.deferred.to(torch.int64), _nonfinite(q_logits)[:, None],
                          _nonfinite(p_logits)[:, None]], dim=1)

    def _fixed_block(self, rows: _Rows, width: int):
        """The block on fixed shapes (every row drafts gamma tokens), as one body of device work
        with one host read: eager, or replayed as a CUDA graph. Returns per row ``(accepted,
        tokens to emit, deferred flags, drafts the sequential engine would have verified)`` and
        the number of drafter calls.

        With ``bonus="cascade"`` the graph runs the bonus drafter step in every block; eagerly it
        runs after the host read, only if a row accepted all its drafts and keeps a bonus token,
        followed by a second verification (same keys: same decisions, the bonus from the
        cascade's target) and a second read."""
        cfg, q, p, gamma = self.cfg, self.q, self.p, self.cfg.gamma
        kv, greedy = self._kv(rows), rows.greedy
        in_body = cfg.bonus_step and self._graphs is not None
        if self._verify is None:
            self._verify = backends.get(cfg.backend, self.device)

        def body(ints, seeds, temperature, alpha):
            t = ints[:, 0]
            ids = ints[:, 1 + width:]
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
            slots = (t - 1)[:, None] + torch.arange(gamma + 1, device=t.device)
            p_logits = p.forward(torch.cat([ids[:, -1:], drafts], dim=1), slots, kv(gamma),
                                 gamma + 1)
            q_logits = torch.stack(q_rows, dim=1)
            pack = self._verified(q_logits, drafts, p_logits, seeds, temperature, alpha, t)
            return pack, q_logits, p_logits

        n = self._bucket(rows.size)
        per_row = rows.padded(n)  # seeds, temperature, alpha
        ints = self._inputs(rows, q, width, n)
        pack, q_logits, p_logits = self._run(("block", n, width, greedy), body, (ints, *per_row))
        host = pack.tolist()[: rows.size]  # the block's one device-to-host read
        self._check_logits([r[-2] for r in host], ("drafter logits", q_logits))
        self._check_logits([r[-1] for r in host], ("verifier logits", p_logits))
        drafts = [row[2 + gamma: 2 + 2 * gamma] for row in host]
        # what the sequential engine would have verified: drafts up to the first EOS draft and
        # the budget (later ones exist only because block shapes are fixed)
        g = [min(gamma, rows.remaining(b),
                 next((i + 1 for i, d in enumerate(x) if d in rows.eos), gamma))
             for b, x in enumerate(drafts)]
        calls = gamma + in_body
        if not in_body and any(self._needs_bonus(rows, b, host[b][0], x[: g[b]])
                               for b, x in enumerate(drafts)):
            t, draft_ids = ints[:, 0], pack[:, 2 + gamma: 2 + 2 * gamma]
            bonus = q.forward(draft_ids[:, -1:], (t + gamma - 1)[:, None], kv(gamma), 1)[:, 0]
            q_logits = torch.cat([q_logits, bonus[:, None]], dim=1)
            host = self._verified(q_logits, draft_ids, p_logits, *per_row, t).tolist()[
                : rows.size]  # the block's second host read
            self._check_logits([r[-2] for r in host], ("drafter logits", q_logits))
            calls += 1
        results = [(row[0], row[1: 2 + row[0]], row[2 + 2 * gamma: 3 + 3 * gamma], g[b])
                   for b, row in enumerate(host)]
        return results, calls

    def _adaptive_block(self, rows: _Rows, width: int):
        """The block with ``draft_confidence``: row b stops drafting after draft gamma_b, its
        first unsure draft (or an EOS draft, its budget, ``gamma``), exactly where the sequential
        engine stops; the drafter steps go on while any row drafts, and each row is verified on
        its own gamma_b drafts in one ragged call. A row that stopped early has q at its bonus
        position from the later steps; the bonus drafter step runs only if a row that drafted to
        the end accepted everything and keeps a bonus (then the ragged call runs again with the
        bonus rows). Returns what :meth:`_fixed_block` does.

        Every piece is a body of fixed shapes (replayed as a CUDA graph when the engine has
        them): a drafter step (its draw and whether the draft is unsure; one host read each),
        then the verifier's forward over the S drafts of the longest row with the ragged
        verification (drafts, q and p stay padded to S per row; the flattened rows are gathered
        on the device, padding after ``cu[B]``), and, if a row needs it, the verification again
        with the bonus rows. Between two drafter steps the host only reads the step's packed
        result and feeds it back as the next step's input: the steps write their logits and
        drafts into the engine's step buffers (:meth:`_buffers`) themselves, at the step index
        the packed positions carry, so nothing is cloned or stacked per step."""
        cfg, q, B = self.cfg, self.q, rows.size
        nb = self._bucket(B)  # the rows the bodies run (B, or B's bucket with CUDA graphs)
        seeds, temperature, alpha = rows.padded(nb)
        greedy, args = rows.greedy, (seeds, temperature)
        kv = self._kv(rows)

        def drafted(logits, tj, t0, seeds, temperature):
            """Draw draft j = tj - t0 (the same j in every row), store it and its logits in the
            step buffers (column j) and pack (draft, unsure, non-finite, tj, t0) for the host."""
            x = self._draw(logits, seeds, temperature, tj, greedy)
            unsure = draft_probability(logits, x, temperature) < cfg.draft_confidence
            q_buf, d_buf = self._buffers(logits)
            j = (tj - t0)[:1]
            q_buf[:nb].index_copy_(1, j, logits[:, None])
            d_buf[:nb].index_copy_(1, j, x[:, None])
            return torch.stack([x, unsure.to(torch.int64), _nonfinite(logits), tj, t0], dim=1)

        def first(ints, seeds, temperature):
            logits = q.forward(ints[:, 1 + width:], ints[:, 1: 1 + width], kv(0), 1)[:, 0]
            return drafted(logits, ints[:, 0], ints[:, 0], seeds, temperature)

        def later(j):  # the step that feeds draft j - 1 and draws draft j: input, step j - 1's pack
            def body(prev, seeds, temperature):
                logits = q.forward(prev[:, :1], prev[:, 3:4], kv(j), 1)[:, 0]
                return drafted(logits, prev[:, 3] + 1, prev[:, 4], seeds, temperature)
            return body

        ints = self._inputs(rows, q, width, nb)
        limit = [min(cfg.gamma, rows.remaining(b)) for b in range(B)]
        stop = [0] * B  # gamma_b once row b has stopped
        mine = [[] for _ in range(B)]  # row b's drafts, on the host
        S = 0  # drafter steps so far
        pack = self._run(("draft", nb, width, greedy), first, (ints, *args))
        q_buf, d_buf = self._buffers()  # allocated by that first step (eager even with graphs)
        while True:
            host = pack.tolist()[:B]  # the step's one device-to-host read
            self._check_logits([r[2] for r in host], ("drafter logits", q_buf[:B, S]))
            for b, (x, low, *_) in enumerate(host):
                if not stop[b]:
                    mine[b].append(x)
                    if low or x in rows.eos or S + 1 >= limit[b]:
                        stop[b] = S + 1
            S += 1
            if all(stop):
                break
            pack = self._run(("draft", nb, 0, greedy), later(S), (pack, *args))
        calls = S
        q_logits, drafts = q_buf[:nb, :S], d_buf[:nb, :S]  # fixed addresses: read, not copied
        # (the padding rows are verified on one draft; nothing reads their outputs)
        stops = torch.tensor(stop + [1] * (nb - B), dtype=torch.int64, device=ints.device)
        head = ints[:, (0, -1)]  # first draft position, the row's last token (ints' width varies)
        verified = self._ragged_verified

        def score(head, stops, seeds, temperature, alpha):
            t = head[:, 0]
            slots = (t - 1)[:, None] + torch.arange(S + 1, device=t.device)
            p_logits = self.p.forward(torch.cat([head[:, 1:], drafts], dim=1), slots, kv(S),
                                      S + 1)
            out = verified(q_logits, drafts, p_logits, stops, None, t, seeds, temperature, alpha)
            return torch.cat([out, _nonfinite(p_logits)[:, None]], dim=1), p_logits

        def rescore(head, p_logits, stops, bonus, seeds, temperature, alpha):
            return verified(q_logits, drafts, p_logits, stops, bonus, head[:, 0], seeds,
                            temperature, alpha)

        pack, p_logits = self._run(("score", nb, S), score, (head, stops, *args, alpha))
        host = pack.tolist()[:B]  # the bonus from pT
        self._check_logits([r[-1] for r in host], ("verifier logits", p_logits))
        need = [self._needs_bonus(rows, b, r[0], mine[b]) for b, r in enumerate(host)]
        if any(need):
            q_all = q_logits
            if any(n and g == S for n, g in zip(need, stop)):
                if self._graphs is not None:  # the bonus step's replay may reuse its memory
                    p_logits = p_logits.clone()  # (_Graphs: outputs live until any replay)
                # the last step's pack again, from the buffers (the score graph may have reused
                # the memory of the step's output)
                t0 = head[:, 0]
                zero = torch.zeros_like(t0)
                last = torch.stack([d_buf[:nb, S - 1], zero, zero, t0 + S - 1, t0], dim=1)
                bpack = self._run(("draft", nb, 0, greedy), later(S), (last, *args))
                self._check_logits(bpack[:B, 2].tolist(), ("drafter logits", q_buf[:B, S]))
                q_all = q_buf[:nb, :S + 1]
                calls += 1
            # rows that need no bonus take any row of theirs: their bonus token is never emitted
            at = stops.clamp(max=q_all.shape[1] - 1)
            bonus = q_all[torch.arange(nb, device=ints.device), at]
            host = self._run(("rescore", nb, S), rescore,
                             (head, p_logits, stops, bonus, *args, alpha)).tolist()[:B]
        return [(r[0], r[1: 2 + r[0]], r[2 + S: 3 + 2 * S], stop[b])
                for b, r in enumerate(host)], calls

    def _buffers(self, logits: torch.Tensor | None = None):
        """A cut block's step buffers: ``[max_batch_size, gamma + 1, V]`` drafter logits and
        ``[max_batch_size, gamma + 1]`` drafts, column j for step j (the last column: the bonus
        step's). Allocated on the first step ever (``logits`` gives V, dtype and device), which
        runs eagerly even with CUDA graphs (a graph's first call runs its body before the
        capture), so a captured step only writes into them and their addresses never change."""
        if self._step_buffers is None:
            n, cols = self.max_batch_size, self.cfg.gamma + 1
            self._step_buffers = (logits.new_empty(n, cols, logits.shape[-1]),
                                  torch.empty(n, cols, dtype=torch.int64, device=logits.device))
        return self._step_buffers

    def _ragged_verified(self, q_logits, drafts, p_logits, stops, bonus, t, seeds, temperature,
                         alpha):
        """The ragged verification of a cut block on fixed shapes, packed for its host read: per
        row the accepted count, the S + 1 tokens and deferral flags, int64 ``[B, 2 S + 3]``.
        Row b owns the first ``stops[b]`` of its S drafts (``q_logits`` ``[B, S, V]``,
        ``drafts`` ``[B, S]``) and ``stops[b] + 1`` of its verifier rows (``p_logits``
        ``[B, S + 1, V]``); ``bonus``: ``[B, V]`` drafter rows at the bonus positions, or None
        (the bonus from pT). The flattened layout is gathered on the device (``B S`` draft
        rows, padding after ``cu[B]``), so nothing here reads the host."""
        cfg = self.cfg
        B, S = drafts.shape
        cu = torch.nn.functional.pad(stops.cumsum(0), (1, 0))
        b, j = row_owners(cu, B * S)
        bt, jt = row_owners(cu, B * S + B, target=True)
        j, jt = j.clamp(0, S - 1), jt.clamp(0, S)  # padding rows: any row
        if self._backend is None:
            self._backend = backends.resolve(cfg.backend, self.device)
        out = ragged_call(self._backend, q_logits[b, j], drafts[b, j], p_logits[bt, jt], cu,
                          bonus, max_spec_len=S, rule=cfg.rule, alpha=alpha,
                          temperature=temperature,
                          top_k=checks.top_k(cfg.top_k, p_logits.shape[-1]), top_p=cfg.top_p,
                          seed=seeds, positions=t)
        return torch.cat([out.num_accepted[:, None], out.tokens,
                          out.deferred.to(torch.int64)], dim=1)


def _budgets(max_new_tokens, B) -> list[int]:
    """``max_new_tokens`` (an int, or B ints) as B ints >= 1."""
    n = max_new_tokens
    if isinstance(n, torch.Tensor):
        n = n.tolist()
    values = n if isinstance(n, (list, tuple)) else [n] * B
    if len(values) != B or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                               for v in values):
        raise ValueError(f"max_new_tokens must be an int >= 1 or {B} such ints (one per "
                         f"sequence), got {max_new_tokens!r}")
    return list(values)


class _Rows:
    """The unfinished sequences of one ``generate`` call (row i of every tensor and list is the
    same sequence; finished ones are dropped) and the outputs of all of them."""

    def __init__(self, engine: Engine, prompts, seeds, temperature, alpha, budget, eos):
        B, device = len(prompts), engine.device
        self.engine = engine
        self.eos = eos
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

    def prefill(self) -> None:
        """Both models take every row's prompt but its last token (which each block feeds)."""
        tokens = torch.zeros(self.size, self.engine.slots, dtype=torch.int64,
                             device=self.engine.device)
        for b, prompt in enumerate(self.prompts):
            tokens[b, : prompt.numel()] = prompt.to(tokens.device)
        for m in (self.engine.q, self.engine.p):
            if m is not None:
                m.prefill(tokens, [n - 1 for n in self.length])

    def stats(self, b: int) -> Counters:
        """Row b's sequence's counters."""
        return self.counters[self.index[b]]

    def remaining(self, b: int) -> int:
        seq = self.index[b]
        return self.budget[seq] - len(self.new_tokens[seq])

    def emit(self, b: int, tokens: list[int], deferred: list[bool]) -> None:
        """Row b emits ``tokens`` up to its first EOS and its budget."""
        self.tail[b] = (self.tail[b] + tokens)[-2:]
        kept = []
        for x in tokens[: self.remaining(b)]:
            kept.append(x)
            if x in self.eos:
                self.done[b] = True
                break
        self.new_tokens[self.index[b]].extend(kept)
        self.length[b] += len(kept)
        self.stats(b).tokens += len(kept)
        self.stats(b).deferred += sum(deferred[: len(kept)])
        if self.remaining(b) <= 0:
            self.done[b] = True

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
        for name in ("length", "index", "done", "tail"):
            setattr(self, name, [getattr(self, name)[b] for b in keep])
