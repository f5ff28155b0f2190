"""End-to-end decoding benchmark: our engine against Hugging Face ``generate`` on one machine.

:func:`run` measures, in one process and one run, on the same prompts (HumanEval's first ``n``
by default) and the same number of new tokens per prompt (EOS does not stop anyone, so every
configuration decodes exactly the same amount):

* ``ours:*``  - :class:`speccascade_fast.Engine` at batch 1 and at batch ``B`` (the prompts in
  chunks of ``B``): the verifier alone, the drafter alone, lossless speculative decoding
  (``spec``, greedy and sampling) and ``token_v3`` cascades;
* ``hf:*``    - ``verifier.generate`` alone, and assisted generation with the same drafter
  (``assistant_model``, ``num_assistant_tokens=gamma``, constant schedule, no confidence
  cut-off), greedy and sampling. HF cannot batch assisted generation, so its batch-``B``
  throughput is its batch-1 run (the same prompts one after another);
* the step costs: one drafter step ``t_q``, one verifier step ``t_p`` and one verifier call on
  ``gamma + 1`` tokens ``t_p(gamma+1)``, each the median of repeated calls at the prompts'
  context: ``c = t_q / t_p`` bounds every method's speed-up.

For each speculative configuration at batch 1 it reports the speed-up over the verifier alone in
the same engine and the speed-up Leviathan et al.'s cost model predicts from the measured tokens
per block ``E`` and step costs, ``E / (gamma c + r)`` with ``r = t_p(gamma+1) / t_p`` (plus ``c``
when the block runs the bonus drafter step): their ratio is the engine's efficiency (1.0 = no
overhead beyond the model calls). Those step costs are timed apart from decoding (a median of
a few calls), on a machine whose speed may drift; so on a CPU the benchmark also times every
forward call of the runs themselves (forward hooks: on a CPU a call's host time is the model's;
on CUDA it is only the launches', so this is left out there) and reports, at batch 1:

* the in-loop step costs: the mean decoding call of the drafter and of the verifier in the
  speculative row (``gamma + 1`` tokens) and of the verifier in ``ours:verifier`` (one token);
* the "decode efficiency": the speed-up of the decoding alone (each run's time less its
  prompts' prefill, which the engine reports as ``stats["prefill_s"]``: the cost model has no
  prefill, and speculation pays the drafter's on top of the verifier's) over the prediction
  from the in-loop costs. What it leaves out is the engine's own time and any model call the
  cost model does not count;
* for every row (ours and HF's), the non-model share: the part of the wall time spent outside
  the models' forward calls.

It also lists the tokens per block the i.i.d. formula ``(1 - a^(gamma+1)) / (1 - a)`` would give
for the measured acceptance rate ``a``.
"""
from __future__ import annotations

import copy
import json
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from ..config import check_draft_confidence
from ..engine import Engine
from .overhead import _sync


@dataclass
class Row:
    """One measured configuration."""

    name: str
    batch: int
    tokens: int
    wall_s: float
    verifier_calls: int | None = None
    acceptance_rate: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def tokens_per_verifier_call(self) -> float | None:
        return self.tokens / self.verifier_calls if self.verifier_calls else None


def humaneval_prompts(tokenizer, n: int) -> list[torch.Tensor]:
    """The first ``n`` HumanEval prompts (raw code completion), tokenized, each ``[P]``."""
    from ..eval.tasks.humaneval import HumanEval

    task = HumanEval()
    return [tokenizer(task.build_prompt(ex), return_tensors="pt").input_ids[0]
            for ex in task.examples(n)]


def _left_pad(prompts, pad: int):
    width = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, width - p.numel():] = p
        mask[b, width - p.numel():] = 1
    return ids, mask


def _chunks(items, size):
    return [items[i: i + size] for i in range(0, len(items), size)]


def run_ours(name, drafter, verifier, prompts, *, batch, max_new_tokens, pad, warmup=0,
             **settings) -> Row:
    """Our engine on ``prompts`` in chunks of ``batch`` (one Engine, built before the clock;
    ``warmup`` > 0: first one untimed generate of that many tokens (at most
    ``max_new_tokens``, which the engine is sized for) on the first chunk, on the
    same Engine: compiled code is compiled, and a goodput controller has measured its step
    times at this batch size, as in a long-running engine).
    ``extra``: ``prefill_s`` and ``drafter_calls`` (the stat: per row, the drafter calls of the
    blocks it rode in) summed over the chunks and, for eager models on a CPU, ``model_s``
    (the seconds inside the models' forward calls) and, at batch 1, ``decode_calls``: per model
    ``[calls, seconds]`` of its decoding calls (a generate's last ``drafter_calls`` /
    ``verifier_calls`` calls of that model: the ones before are its prefill)."""
    longest = max(p.numel() for p in prompts)
    engine = Engine(drafter, verifier, max_batch_size=batch,
                    max_seq_len=longest + max_new_tokens, **settings)
    if warmup:
        ids, mask = _left_pad(prompts[:batch], pad)
        engine.generate(ids, attention_mask=mask, max_new_tokens=min(warmup, max_new_tokens),
                        eos_token_id=[], seed=0)
    tokens = calls = accepted = drafted = drafter_calls = 0
    prefill = 0.0
    outputs, gammas = [], []
    log_loss = None  # each acceptance predictor's mean log-loss over the chunks (goodput)
    roles = {"drafter": engine.drafter, "verifier": engine.verifier}
    roles = {k: m for k, m in roles.items() if m is not None}
    decode = {k: [0, 0.0] for k in roles}
    # no hooks on compiled models (dynamo would trace them)
    timed = [] if settings.get("compile_drafter") else list(roles.values())
    with _ModelClock(*timed) as clock:
        start = time.perf_counter()
        for chunk in _chunks(prompts, batch):
            ids, mask = _left_pad(chunk, pad)
            clock.clear()
            out = engine.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  eos_token_id=[], seed=list(range(len(chunk))))
            tokens += out.stats["tokens"]
            calls += out.stats["verifier_calls"]
            accepted += out.stats["accepted"]
            drafted += out.stats["drafted"]
            drafter_calls += out.stats["drafter_calls"]
            prefill += out.stats["prefill_s"]
            outputs += out.new_tokens
            gammas += out.stats.get("gammas", [])
            log_loss = pool_log_loss(log_loss, out.stats.get("acceptance_log_loss"))
            for i, role in enumerate(roles if timed and len(chunk) == 1 else ()):
                n = out.stats[role + "_calls"]  # one row: the counts are forward calls
                decode[role][0] += n
                decode[role][1] += sum(clock.times[i][len(clock.times[i]) - n:])
        wall = time.perf_counter() - start
    row = Row(name, batch, tokens, wall, calls or None, accepted / drafted if drafted else None)
    row.extra.update(outputs=outputs, prefill_s=prefill, model_s=clock.model_s,
                     drafter_calls=drafter_calls)
    if settings.get("draft_confidence") is not None:
        row.extra["draft_confidence"] = settings["draft_confidence"]
    if "gamma" in settings:  # the row's own (most) drafts per block: @gN may differ from the run's
        row.extra["gamma"] = settings["gamma"]
    if settings.get("gamma_policy", "fixed") != "fixed":
        row.extra["gamma_policy"] = settings["gamma_policy"]
        row.extra["gammas"] = {g: gammas.count(g) for g in sorted(set(gammas))}  # blocks per gamma
    if log_loss is not None:  # mean log-loss per verified draft position, per predictor
        row.extra["acceptance_log_loss"] = log_loss
    if clock.model_s is not None and batch == 1:
        row.extra["decode_calls"] = decode
    return row


class _ModelClock:
    """Forward calls per model and the seconds spent inside them (hooks, removed on exit).

    ``model_s`` is None unless there are models and every one is on the CPU: there a forward
    call's host time is the model's time; on CUDA it is only the launches'."""

    def __init__(self, *models):
        self.models = list(models)
        self.calls = [0] * len(self.models)
        self.enabled = bool(self.models) and all(
            next(m.parameters()).device.type == "cpu" for m in self.models)
        self.seconds = 0.0
        self.times: list[list[float]] = [[] for _ in self.models]  # since the last clear()
        self._begin = 0.0

    @property
    def model_s(self) -> float | None:
        return self.seconds if self.enabled else None

    def clear(self) -> None:
        """Forget the per-call times (the totals stay)."""
        self.times = [[] for _ in self.models]

    def __enter__(self):
        self.handles = []
        for i, m in enumerate(self.models):
            self.handles.append(m.register_forward_pre_hook(lambda *_, i=i: self._pre(i)))
            if self.enabled:
                self.handles.append(m.register_forward_hook(lambda *_, i=i: self._post(i)))
        return self

    def _pre(self, i):
        self.calls[i] += 1
        self._begin = time.perf_counter()

    def _post(self, i):
        took = time.perf_counter() - self._begin
        self.seconds += took
        self.times[i].append(took)

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def run_hf(name, verifier, prompts, *, max_new_tokens, assistant=None, gamma=5,
           temperature=0.0, hf_defaults=False, batch=1, pad=0) -> Row:
    """HF ``generate`` on each prompt in turn (EOS disabled: exactly ``max_new_tokens``), or
    without an assistant on chunks of ``batch`` prompts, left-padded with ``pad`` (HF assisted
    generation takes one sequence at a time).

    With an ``assistant``: ``gamma`` drafts per block, constant schedule, no confidence cut-off;
    or, with ``hf_defaults``, whatever HF does when told nothing (its defaults: up to 20 drafts,
    a block ends after a draft the assistant gave less than ``assistant_confidence_threshold``
    = 0.4, a threshold HF re-fits during generation when scikit-learn is installed), recorded
    in ``row.extra["hf_settings"]``."""
    config = copy.deepcopy(verifier.generation_config)
    config.eos_token_id = None
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = None
    config.do_sample = temperature > 0
    config.temperature = temperature if temperature > 0 else None
    config.top_k, config.top_p = (None, None)
    if config.pad_token_id is None:
        config.pad_token_id = 0
    kwargs = {}
    saved = None
    if batch > 1 and assistant is not None:
        raise ValueError("HF assisted generation runs at batch 1 only")
    if assistant is not None:
        # HF reads the drafting schedule from the ASSISTANT's generation config
        kwargs["assistant_model"] = assistant
        saved = assistant.generation_config
        assistant.generation_config = copy.deepcopy(saved)
        if not hf_defaults:
            for gc in (config, assistant.generation_config):
                gc.num_assistant_tokens = gamma
                gc.num_assistant_tokens_schedule = "constant"
                gc.assistant_confidence_threshold = 0.0
        hf_settings = _hf_assistant_settings(assistant.generation_config)
    tokens, outputs, row_calls = 0, [], 0  # row_calls: per row, the calls it was in, summed
    try:
        with _ModelClock(verifier, *([assistant] if assistant is not None else [])) as clock:
            start = time.perf_counter()
            for b, chunk in enumerate(_chunks(prompts, batch)):
                torch.manual_seed(b)
                ids, mask = _left_pad(chunk, pad)
                ids, mask = ids.to(verifier.device), mask.to(verifier.device)
                before = clock.calls[0]
                out = verifier.generate(ids, attention_mask=mask, generation_config=config,
                                        **kwargs)
                row_calls += (clock.calls[0] - before) * len(chunk)
                for row in out[:, ids.shape[1]:].tolist():
                    tokens += len(row)
                    outputs.append(row)
            wall = time.perf_counter() - start
    finally:
        if saved is not None:
            assistant.generation_config = saved
    row = Row(name, batch, tokens, wall, row_calls)
    row.extra.update(outputs=outputs, model_s=clock.model_s)
    if assistant is not None:
        row.extra["hf_settings"] = hf_settings
    return row


def _hf_assistant_settings(assistant_config) -> dict:
    """The drafting settings HF assisted generation resolves from the assistant's generation
    config (its global defaults where the config leaves them unset)."""
    from transformers.utils import is_sklearn_available

    config = copy.deepcopy(assistant_config)
    config.update(**config._get_default_generation_params(), defaults_only=True)
    keys = ("num_assistant_tokens", "num_assistant_tokens_schedule",
            "assistant_confidence_threshold")
    out = {k: getattr(config, k) for k in keys}
    # HF re-fits the threshold during generation only with scikit-learn
    out["threshold_refit"] = bool(out["assistant_confidence_threshold"]) and is_sklearn_available()
    return out


def step_costs(drafter, verifier, prompt, gamma: int, repeats: int = 9,
               compile_drafter: bool = False) -> dict:
    """Median seconds of one drafter step, one verifier step and one verifier call on
    ``gamma + 1`` tokens, at the context of ``prompt`` (the caches are filled once; every timed
    call then writes the same slots again; with ``compile_drafter`` the drafter step is the
    compiled one, compiled by two untimed calls first)."""
    engine = Engine(drafter, verifier, max_batch_size=1, max_seq_len=prompt.numel() + gamma + 1,
                    gamma=gamma, temperature=0.0, compile_drafter=compile_drafter)
    tokens = torch.zeros(1, engine.slots, dtype=torch.int64, device=engine.device)
    tokens[0, : prompt.numel()] = prompt.to(engine.device)
    P = prompt.numel()

    def call(m, k, start):
        """``m`` takes the k tokens at positions ``start .. start + k - 1``."""
        slots = torch.arange(start, start + k, device=engine.device)[None]
        m.forward(tokens[:, start: start + k], slots, start + k, k)

    def timed(m, k):
        times = []
        for _ in range(repeats):
            _sync(engine.device)
            begin = time.perf_counter()
            call(m, k, P - 1)
            _sync(engine.device)
            times.append(time.perf_counter() - begin)
        return statistics.median(times)

    with torch.inference_mode():
        for m in (engine.q, engine.p):
            m.seen = [0]
            m.prefill(tokens, [P - 1])
        if compile_drafter:  # compile (a second context length makes the size dynamic)
            for extra in (0, 1):
                call(engine.q, 1, P - 1 - extra)
        t_q, t_p, t_block = timed(engine.q, 1), timed(engine.p, 1), timed(engine.p, gamma + 1)
    return {"t_q_s": t_q, "t_p_s": t_p, "t_p_block_s": t_block, "c": t_q / t_p,
            "r": t_block / t_p}


def predicted_speedup(tokens_per_block: float, gamma: int, c: float, r: float,
                      bonus_step: bool = False) -> float:
    """Leviathan et al.'s cost model with the measured tokens per block: a block costs
    ``gamma`` drafter steps (+1 with the bonus step), i.e. ``gamma c (+ c)``, plus one verifier
    call, ``r``, in units of one verifier step, and emits ``tokens_per_block`` tokens. The
    speed-up over the verifier alone an engine without overhead would reach. (Blocks of varying
    length: ``gamma`` the mean drafter steps per block, ``r`` the mean verifier call.)"""
    return tokens_per_block / (gamma * c + r + (c if bonus_step else 0.0))


def iid_tokens_per_block(acceptance: float, gamma: int) -> float:
    """Leviathan et al.'s expected tokens per block, ``(1 - a^(gamma+1)) / (1 - a)``, if every
    draft were accepted independently with probability ``a`` (real acceptance comes in runs, so
    measured blocks usually emit more)."""
    a = min(acceptance, 1 - 1e-12)
    return (1 - a ** (gamma + 1)) / (1 - a)


#: the row of our verifier alone sampling at T = 1: the baseline of the T = 1 rows where it ran
VERIFIER_T1 = "ours:verifier T=1"
#: our configurations: key -> (row name, Engine settings); ``{alpha}`` is filled in by run()
CONFIGS = {
    "verifier": ("ours:verifier", dict(method="autoregressive", temperature=0.0)),
    "verifier-t1": (VERIFIER_T1, dict(method="autoregressive", temperature=1.0)),
    "drafter": ("ours:drafter", dict(method="drafter_only", temperature=0.0)),
    "spec-greedy": ("ours:spec greedy", dict(rule="spec", temperature=0.0)),
    "spec-t1": ("ours:spec T=1", dict(rule="spec", temperature=1.0)),
    "token_v3-greedy": ("ours:token_v3 a={alpha} greedy", dict(rule="token_v3", temperature=0.0)),
    "token_v3-t1": ("ours:token_v3 a={alpha} T=1", dict(rule="token_v3", temperature=1.0)),
    # blocks cut after the first unsure draft (Engine(draft_confidence=...)), at most dc_gamma
    "spec-greedy-dc": ("ours:spec greedy, draft confidence {dc}",
                       dict(rule="spec", temperature=0.0, draft_confidence=None)),
    "spec-t1-dc": ("ours:spec T=1, draft confidence {dc}",
                   dict(rule="spec", temperature=1.0, draft_confidence=None)),
    "token_v3-t1-dc": ("ours:token_v3 a={alpha} T=1, draft confidence {dc}",
                       dict(rule="token_v3", temperature=1.0, draft_confidence=None)),
    # each block's gamma (at most --gamma) chosen for goodput (Engine(gamma_policy="goodput"))
    "spec-greedy-goodput": ("ours:spec greedy, goodput gamma",
                            dict(rule="spec", temperature=0.0, gamma_policy="goodput")),
    "spec-t1-goodput": ("ours:spec T=1, goodput gamma",
                        dict(rule="spec", temperature=1.0, gamma_policy="goodput")),
    "token_v3-t1-goodput": ("ours:token_v3 a={alpha} T=1, goodput gamma",
                            dict(rule="token_v3", temperature=1.0, gamma_policy="goodput")),
    # the same with acceptance predicted from the drafter's confidence
    # (Engine(gamma_policy="goodput_confidence"))
    "spec-greedy-goodput-conf": ("ours:spec greedy, goodput gamma (confidence)",
                                 dict(rule="spec", temperature=0.0,
                                      gamma_policy="goodput_confidence")),
    "spec-t1-goodput-conf": ("ours:spec T=1, goodput gamma (confidence)",
                             dict(rule="spec", temperature=1.0,
                                  gamma_policy="goodput_confidence")),
    "token_v3-t1-goodput-conf": ("ours:token_v3 a={alpha} T=1, goodput gamma (confidence)",
                                 dict(rule="token_v3", temperature=1.0,
                                      gamma_policy="goodput_confidence")),
    # the lenience controls: the first {window} tokens verified losslessly (exact_prefix), and a
    # divergence budget (docs/semantics.md §9); their cost against plain token_v3-t1
    "token_v3-t1-window": ("ours:token_v3 a={alpha} T=1, exact prefix {window}",
                           dict(rule="token_v3", temperature=1.0, exact_prefix=None)),
    "token_v3-t1-budget": ("ours:token_v3 a={alpha} T=1, divergence budget {budget}",
                           dict(rule="token_v3", temperature=1.0, divergence_budget=None)),
}


def split_key(key: str) -> tuple[str, int | None]:
    """A configuration key and its fixed draft length: ``"spec-t1@g2"`` is ``spec-t1`` with
    gamma 2 (for a ``*-goodput`` key, at most 2); ``(key, None)`` without ``@g``. A ValueError
    names a key that is not a :data:`CONFIGS` key (with ``@gN``: a speculative one without
    draft confidence, N >= 1)."""
    base, sep, g = key.partition("@g")
    if base not in CONFIGS:
        raise ValueError(f"unknown config {key!r}; choose from {', '.join(CONFIGS)} (a "
                         "speculative one may end in @gN: N drafts per block)")
    if not sep:
        return base, None
    settings = CONFIGS[base][1]
    if "rule" not in settings or "draft_confidence" in settings \
            or not re.fullmatch(r"[1-9][0-9]*", g):
        raise ValueError(f"config {key!r}: @gN (N >= 1 drafts per block) applies to the "
                         "speculative configurations without draft confidence")
    return base, int(g)


#: ``run``'s defaults for the ``*-window`` and ``*-budget`` configurations
DEFAULT_EXACT_PREFIX = 16
DEFAULT_DIVERGENCE_BUDGET = 1.0
#: ``run``'s default ``draft_confidence`` (picked from 0.5-0.8 in an exploratory run on three
#: HumanEval prompts with the default pair; CHANGELOG.md)
DEFAULT_DRAFT_CONFIDENCE = 0.6
#: the name suffix of HF assisted generation with HF's own defaults (``hf_defaults``)
HF_DEFAULTS_SUFFIX = " (HF defaults)"
#: the configurations re-run with the int8 drafter
INT8_CONFIGS = ("drafter", "spec-greedy", "token_v3-t1")
#: the name suffix of a configuration re-run with the drafter's steps torch.compile'd
COMPILED_SUFFIX = " (compiled drafter)"


def run(drafter, verifier, tokenizer=None, *, prompts=None, n_prompts=5, max_new_tokens=128,
        batch=4, gamma=5, alpha=0.3, with_hf=True, configs=tuple(CONFIGS), int8_drafter=False,
        compile_drafter=False, rounds=1, hf_gamma=None, hf_defaults=False,
        draft_confidence=DEFAULT_DRAFT_CONFIDENCE, dc_gamma=None, weights="real",
        quant="bf16", exact_prefix=DEFAULT_EXACT_PREFIX,
        divergence_budget=DEFAULT_DIVERGENCE_BUDGET, per_config_rss=False, warmup_tokens=0,
        progress=print) -> dict:
    """The whole benchmark; returns ``{"rows", "costs", "settings", "machine"}``.

    ``prompts``: token tensors ``[P]`` (default: the first ``n_prompts`` HumanEval prompts,
    tokenized with ``tokenizer``). ``configs``: keys of :data:`CONFIGS` to run (``verifier`` is
    always run: it is every ratio's baseline). ``int8_drafter``: also measure a weight-only int8
    copy of the drafter (:func:`speccascade_fast.quantize.int8_weight_only`): its step cost, the
    :data:`INT8_CONFIGS` rows at batch 1 (and those of ``configs`` at ``batch`` too) and, with
    ``with_hf``, HF assisted generation with the same int8 assistant. ``compile_drafter``: the
    drafter's steps ``torch.compile``d: its step cost, and at batch 1 the drafter alone and
    each configuration of ``configs`` that drafts, again with the compiled drafter
    (:data:`COMPILED_SUFFIX`; compilation happens before the clock). ``hf_gamma``: HF
    assisted generation's draft length (default ``gamma``), so that each tool can run at its
    own best setting. ``hf_defaults``: with ``with_hf``, also HF assisted generation as HF runs
    it when told nothing (rows ``hf:assisted ... (HF defaults)``, see :func:`run_hf`).
    ``draft_confidence``: the cut-off
    of the ``*-dc`` configurations (blocks of at most ``dc_gamma`` drafts, default ``gamma``,
    ended after the first draft the drafter gave less than this; their names say "at most
    N drafts" when ``dc_gamma`` is not ``gamma``). ``weights``: "real", or "random" for models
    of the real shapes with random weights (``speccascade bench --random-weights``: the
    comparison on a machine the real weights cannot reach; recorded in the settings, and the
    table says that acceptance is then not meaningful). ``quant``: the models' weights as
    loaded ("bf16", "int8" or "q4": ``speccascade bench --weights``), recorded in the settings;
    the result's ``memory`` holds this process's peak and final resident memory
    (:func:`memory`), which covers the models' loading when they were loaded in it.
    ``per_config_rss`` (Linux): each row also gets its own peak (``extra["peak_rss_mib"]``:
    the peak is restarted before each of its runs, so it is the memory resident then, the
    loaded models among it, plus what the run allocated; the largest over the rounds); the
    process's peak is then the largest of what it was before the first restart and every
    row's. Off by default: a restarted peak also lowers what ``getrusage``/``wait4`` report for
    the process (``ru_maxrss``).
    ``exact_prefix`` / ``divergence_budget``: the ``*-window`` / ``*-budget`` configurations'
    settings. ``warmup_tokens``: before each of our runs, one untimed generate of that many
    tokens on its Engine (:func:`run_ours`; 0: none, as a one-shot call runs; the compiled
    rows take at least 8); the Hugging Face rows have nothing to warm.

    ``batch``: the batched runs' size, or a list of sizes (each runs every configuration but
    the drafter alone; batch 1 always runs).

    ``rounds``: run every configuration that many times, interleaved (round ``i`` runs them all,
    in reverse order when ``i`` is odd, and first re-times the step costs), so that a machine
    whose speed drifts during the run biases no configuration against another. A row's figures
    are its totals over the rounds (the decoded tokens are the same in every round: same inputs,
    same seeds); ``row.extra["round_tokens_per_s"]`` keeps each round's speed, from which
    :func:`summarize` gives each ratio's range over the rounds. Step costs are the medians of
    the rounds'."""
    order = list(CONFIGS)
    split = {k: split_key(k) for k in configs}
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if isinstance(warmup_tokens, bool) or not isinstance(warmup_tokens, int) \
            or warmup_tokens < 0:
        raise ValueError(f"warmup_tokens must be an int >= 0, got {warmup_tokens!r}")
    batches = [batch] if isinstance(batch, int) else list(batch)
    if not batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                          for b in batches):
        raise ValueError(f"batch must be an int >= 1 or a list of them, got {batch!r}")
    batches = [b for b in dict.fromkeys(batches) if b > 1]  # batch 1 always runs
    check_draft_confidence(draft_confidence)
    hf_gamma = gamma if hf_gamma is None else hf_gamma
    dc_gamma = gamma if dc_gamma is None else dc_gamma
    if dc_gamma < 1:
        raise ValueError(f"dc_gamma must be >= 1, got {dc_gamma}")
    if weights not in ("real", "random"):
        raise ValueError(f"weights must be 'real' or 'random', got {weights!r}")
    if prompts is None:
        prompts = humaneval_prompts(tokenizer, n_prompts)
    n_prompts = len(prompts)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else pad
    common = dict(max_new_tokens=max_new_tokens, pad=pad)
    keys = ["verifier", *sorted((k for k in split if k != "verifier"), key=lambda k: (
        order.index(split[k][0]), split[k][1] or 0))]
    jobs = []  # (name, batch, run it once -> Row), in the order of a round

    def ours(key, q, batch, suffix="", **extra):
        key, fixed_gamma = split_key(key)
        name, settings = CONFIGS[key]
        name = name.format(alpha=alpha, dc=draft_confidence, window=exact_prefix,
                           budget=divergence_budget)
        settings = dict(settings, **extra)
        if "exact_prefix" in settings:
            settings["exact_prefix"] = exact_prefix
        if "divergence_budget" in settings:
            settings["divergence_budget"] = divergence_budget
        if "rule" in settings:
            settings["gamma"] = gamma if fixed_gamma is None else fixed_gamma
            if fixed_gamma is not None:
                name += (f", at most {fixed_gamma} drafts" if settings.get("gamma_policy")
                         else f", gamma {fixed_gamma}")
        if "draft_confidence" in settings:
            settings.update(draft_confidence=draft_confidence, gamma=dc_gamma)
            if dc_gamma != gamma:
                name += f", at most {dc_gamma} drafts"
        name += suffix
        if settings.get("rule") == "token_v3":
            settings["alpha"] = alpha
        jobs.append((name, batch, lambda: run_ours(
            name, q, verifier, prompts, batch=batch,
            warmup=max(warmup_tokens, 8 if settings.get("compile_drafter") else 0),
            **common, **settings)))

    def hf(name, batch=1, **kwargs):
        jobs.append((name, batch, lambda: run_hf(name, verifier, prompts, batch=batch, pad=pad,
                                                 max_new_tokens=max_new_tokens, **kwargs)))

    q8 = None
    if int8_drafter:
        from ..quantize import int8_weight_only

        q8 = int8_weight_only(copy.deepcopy(drafter))
    # key in result["costs"] (None: the top level) -> (label, measure once)
    cost_jobs = {None: ("drafter", lambda: step_costs(drafter, verifier, prompts[0], gamma))}
    if q8 is not None:
        cost_jobs["int8"] = ("int8 drafter", lambda: step_costs(q8, verifier, prompts[0], gamma))
    if compile_drafter:
        cost_jobs["compiled"] = ("compiled drafter", lambda: step_costs(
            drafter, verifier, prompts[0], gamma, compile_drafter=True))
    for key in keys:
        ours(key, drafter, 1)
    if with_hf:
        hf("hf:verifier greedy")
        hf("hf:assisted greedy", assistant=drafter, gamma=hf_gamma)
        hf("hf:assisted T=1", assistant=drafter, gamma=hf_gamma, temperature=1.0)
        if hf_defaults:
            hf("hf:assisted greedy" + HF_DEFAULTS_SUFFIX, assistant=drafter, hf_defaults=True)
            hf("hf:assisted T=1" + HF_DEFAULTS_SUFFIX, assistant=drafter, hf_defaults=True,
               temperature=1.0)
    for b in batches:
        for key in keys:
            if key != "drafter":
                ours(key, drafter, b)
        if with_hf:  # HF assisted generation takes one sequence at a time
            hf("hf:verifier greedy", batch=b)
    if q8 is not None:
        for key in INT8_CONFIGS:
            ours(key, q8, 1, suffix=INT8_SUFFIX)
        if with_hf:
            hf("hf:assisted greedy" + INT8_SUFFIX, assistant=q8, gamma=hf_gamma)
            hf("hf:assisted T=1" + INT8_SUFFIX, assistant=q8, gamma=hf_gamma, temperature=1.0)
        for b in batches:
            for key in INT8_CONFIGS:
                if key != "drafter" and key in keys:
                    ours(key, q8, b, suffix=INT8_SUFFIX)
    if compile_drafter:  # the drafter alone, and each configuration asked for that drafts
        drafting = [k for k in keys if "rule" in CONFIGS[split_key(k)[0]][1]]
        for key in ("drafter", *drafting):
            ours(key, drafter, 1, suffix=COMPILED_SUFFIX, compile_drafter=True)

    merged: dict = {}
    round_costs: dict = {key: [] for key in cost_jobs}
    peak_before = memory().get("peak_rss_mib")  # the process's peak so far (loading included)
    per_config_rss = bool(per_config_rss) and reset_peak_rss()
    for i in range(rounds):
        for key, (label, measure) in cost_jobs.items():
            round_costs[key].append(measure())
            _say_costs(progress, label, round_costs[key][-1])
        for *_, job in (jobs if i % 2 == 0 else jobs[::-1]):
            if per_config_rss:  # this run's peak: what is resident now plus what it allocates
                reset_peak_rss()
            row = job()
            if per_config_rss:
                row.extra["peak_rss_mib"] = memory().get("peak_rss_mib")
            tpc = row.tokens_per_verifier_call
            progress(f"{row.name:36s} batch {row.batch}: {row.tokens_per_s:6.2f} tok/s"
                     + (f", {tpc:.2f} tokens/verifier call" if tpc else "")
                     + (f" (round {i + 1}/{rounds})" if rounds > 1 else ""))
            _merge(merged, row)
    rows = [merged[name, batch_] for name, batch_, _ in jobs]
    medians = {key: {k: statistics.median(c[k] for c in cs) for k in cs[0]}
               for key, cs in round_costs.items()}
    costs = medians.pop(None)
    costs.update(medians)
    mem = memory()
    if per_config_rss and mem.get("peak_rss_mib") is not None:  # the process's own peak
        mem["peak_rss_mib"] = max([mem["peak_rss_mib"], peak_before or 0.0,
                                   *(r.extra.get("peak_rss_mib") or 0.0 for r in rows)])
    return {"rows": rows, "costs": costs, "settings": dict(
        n_prompts=n_prompts, max_new_tokens=max_new_tokens, batch=batch, gamma=gamma,
        alpha=alpha, rounds=rounds, hf_gamma=hf_gamma, draft_confidence=draft_confidence,
        dc_gamma=dc_gamma, weights=weights, quant=quant, exact_prefix=exact_prefix,
        divergence_budget=divergence_budget, per_config_rss=per_config_rss,
        warmup_tokens=warmup_tokens),
        "machine": machine(getattr(verifier, "device", None)), "memory": mem}


def memory() -> dict:
    """This process's peak resident memory (``VmHWM``) and resident memory now (``VmRSS``), in
    MiB, from /proc/self/status (empty where there is none)."""
    out = {}
    try:
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[{"VmHWM": "peak_rss_mib", "VmRSS": "rss_mib"}[key]] = \
                    round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Restart this process's ``VmHWM`` from its resident memory now (Linux: ``5`` written to
    /proc/self/clear_refs), so that :func:`memory` then gives the peak since this call; False
    where that cannot be done (the peak then covers the whole process)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


#: the name suffix of the rows that ran the int8 drafter (ours) or the int8 assistant (HF)
INT8_SUFFIX = " (int8 drafter)"


def _merge(merged: dict, row: Row) -> None:
    """Add one round's ``row`` to the running totals of its configuration."""
    speed = row.tokens / row.wall_s
    total = merged.get((row.name, row.batch))
    if total is None:
        row.extra["round_tokens_per_s"] = [speed]
        merged[row.name, row.batch] = row
        return
    if row.extra["outputs"] != total.extra["outputs"]:  # not expected: same inputs and seeds
        total.extra["rounds_differ"] = True
    total.tokens += row.tokens
    total.wall_s += row.wall_s
    for key in ("prefill_s", "model_s", "drafter_calls"):
        if total.extra.get(key) is not None and row.extra.get(key) is not None:
            total.extra[key] += row.extra[key]
    if "decode_calls" in total.extra and "decode_calls" in row.extra:
        for role, (n, sec) in row.extra["decode_calls"].items():
            total.extra["decode_calls"][role][0] += n
            total.extra["decode_calls"][role][1] += sec
    if total.verifier_calls is not None:
        total.verifier_calls += row.verifier_calls
    if row.extra.get("peak_rss_mib") is not None:  # the largest of the rounds' peaks
        total.extra["peak_rss_mib"] = max(row.extra["peak_rss_mib"],
                                          total.extra.get("peak_rss_mib") or 0.0)
    if "gammas" in total.extra and "gammas" in row.extra:  # blocks per gamma, every round's
        for g, n in row.extra["gammas"].items():
            total.extra["gammas"][g] = total.extra["gammas"].get(g, 0) + n
    log_loss = pool_log_loss(total.extra.get("acceptance_log_loss"),
                             row.extra.get("acceptance_log_loss"))
    if log_loss is not None:  # mean log-loss over every round's positions
        total.extra["acceptance_log_loss"] = log_loss
    total.extra["round_tokens_per_s"].append(speed)


def pool_log_loss(a: dict | None, b: dict | None) -> dict | None:
    """Two ``acceptance_log_loss`` summaries (``{predictor: mean, ..., "positions": n}``) as
    one: each predictor's mean weighted by the positions; None where neither scored any."""
    parts = [x for x in (a, b) if x and x.get("positions")]
    if not parts:
        return None
    n = sum(x["positions"] for x in parts)
    return {k: sum(x[k] * x["positions"] for x in parts) / n
            for k in parts[0] if k != "positions"} | {"positions": n}


def _say_costs(progress, what, c):
    progress(f"step costs ({what}): t_q {c['t_q_s'] * 1e3:.1f} ms, t_p {c['t_p_s'] * 1e3:.1f} ms, "
             f"t_p(gamma+1) {c['t_p_block_s'] * 1e3:.1f} ms: c = {c['c']:.3f}, r = {c['r']:.3f}")


def machine(device: torch.device | None = None) -> dict:
    out = {"platform": platform.platform(), "processor": platform.processor(),
           "torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d")}
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def summarize(result: dict) -> list[dict]:
    """Per row: tok/s, tokens per verifier call, speed-ups against the verifier alone (ours, same
    batch: greedy, or for a T = 1 row at T = 1 where :data:`VERIFIER_T1` ran), HF's verifier
    alone and HF assisted generation with the same sampling and the same drafter (the int8
    assistant for the int8 rows, when it ran; both at batch 1: HF's verifier alone at the row's
    batch size where it ran there), the non-model share of the wall time (CPU), and for our
    speculative rows at batch 1 the Leviathan prediction and the efficiency, of the whole runs
    and of their decoding alone (without the prompts' prefill). With several rounds,
    ``*_range`` gives the lowest and highest of a ratio's per-round values (both rows' speeds
    from the same round)."""
    rows: list[Row] = result["rows"]
    costs, gamma = result["costs"], result["settings"]["gamma"]
    by = {(r.name, r.batch): r for r in rows}
    hf = {r.name: r for r in rows if r.name.startswith("hf:") and r.batch == 1}
    out = []
    for r in rows:
        base = by.get((VERIFIER_T1, r.batch)) if ("T=1" in r.name
                                                   and r.name != VERIFIER_T1) else None
        base = base or by.get(("ours:verifier", r.batch))
        d = {"name": r.name, "batch": r.batch, "tokens": r.tokens, "wall_s": round(r.wall_s, 2),
             "tokens_per_s": round(r.tokens_per_s, 3),
             "tokens_per_verifier_call": _round(r.tokens_per_verifier_call),
             "acceptance_rate": _round(r.acceptance_rate)}
        if r.extra.get("model_s") is not None:
            d["non_model_share"] = _round(1 - r.extra["model_s"] / r.wall_s)
        if r.extra.get("peak_rss_mib") is not None:
            d["peak_rss_mib"] = round(r.extra["peak_rss_mib"])
        assisted = "hf:assisted T=1" if "T=1" in r.name else "hf:assisted greedy"
        if INT8_SUFFIX in r.name and assisted + INT8_SUFFIX in hf:
            assisted += INT8_SUFFIX
        for field_, other in (("vs_ours_verifier", base),
                              ("vs_hf_verifier", by.get(("hf:verifier greedy", r.batch),
                                                        hf.get("hf:verifier greedy"))),
                              ("vs_hf_assisted", hf.get(assisted)),
                              ("vs_hf_defaults", hf.get(assisted.replace(INT8_SUFFIX, "")
                                                        + HF_DEFAULTS_SUFFIX))):
            if other is not None:
                d[field_] = _round(r.tokens_per_s / other.tokens_per_s)
                spread = _ratio_range(r, other)
                if spread is not None:
                    d[field_ + "_range"] = spread
        if r.name.startswith("ours:") and r.acceptance_rate is not None and r.batch == 1:
            # blocks cut by draft_confidence vary: their prediction takes the measured drafter
            # steps per block and mean verifier call, i.e. the in-loop costs only
            cut = (r.extra.get("draft_confidence") is not None
                   or r.extra.get("gamma_policy") is not None)
            row_gamma = r.extra.get("gamma", gamma)
            steps, bonus = drafter_steps(r, row_gamma)
            if steps != row_gamma:  # (shown where it is not simply gamma (+ the bonus step))
                d["drafter_steps_per_block"] = _round(steps + bonus)
            if not cut:
                k = (costs["int8"] if "int8" in r.name
                     else costs["compiled"] if "compiled" in r.name else costs)
                pred = predicted_speedup(r.tokens_per_verifier_call, steps, k["c"], k["r"],
                                         bonus_step=bonus)
                d["predicted"] = _round(pred)
                d["iid_tokens_per_block"] = _round(iid_tokens_per_block(r.acceptance_rate,
                                                                        row_gamma))
                if base is not None:
                    # from the unrounded speed-up (the rounded one can move the 3rd decimal)
                    d["efficiency"] = _round(r.tokens_per_s / base.tokens_per_s / pred)
            if base is not None:
                times = _loop_times(r, base)
                if times is not None:
                    d.update(in_loop_costs(r, base))
                    t_q, t_block, t_p = times  # (the prediction from unrounded costs)
                    pred = predicted_speedup(r.tokens_per_verifier_call, steps, t_q / t_p,
                                             t_block / t_p, bonus_step=bonus)
                    d["predicted_loop"] = _round(pred)
                    d["decode_efficiency"] = _round(_decode_speed(r) / _decode_speed(base) / pred)
        out.append(d)
    return out


def drafter_steps(row: Row, gamma: int) -> tuple[float, bool]:
    """``(steps, bonus)``: a speculative row's drafter calls per block for the cost model, as
    ``steps`` plus one if ``bonus``. Measured (the mean, ``bonus`` False) where the row recorded
    its drafter calls: blocks cut by draft confidence vary, and the eager engine runs the bonus
    drafter step only in blocks that accept every draft. Rows of runs that did not record them
    (older result files) ran ``gamma`` steps, plus the bonus step under rules other than
    ``spec``, in every block; their cut rows take the hooks' call counts."""
    if row.extra.get("drafter_calls"):
        return row.extra["drafter_calls"] / row.verifier_calls, False
    calls = row.extra.get("decode_calls")
    if row.extra.get("draft_confidence") is not None and calls is not None:
        return calls["drafter"][0] / calls["verifier"][0], False
    return gamma, "spec" not in row.name


def in_loop_costs(row: Row, base: Row) -> dict | None:
    """The step costs measured while decoding (CPU, batch 1): the mean decoding call of the
    drafter (``t_q_loop_ms``) and of the verifier (``gamma + 1`` tokens, ``t_p_block_loop_ms``)
    in ``row``, and of the verifier in ``base`` (one token, ``t_p_loop_ms``); ``c_loop``,
    ``r_loop`` as in :func:`step_costs`. None without the hooks' timings."""
    times = _loop_times(row, base)
    if times is None:
        return None
    t_q, t_block, t_p = times
    return {"t_q_loop_ms": _round(1e3 * t_q), "t_p_loop_ms": _round(1e3 * t_p),
            "t_p_block_loop_ms": _round(1e3 * t_block), "c_loop": _round(t_q / t_p),
            "r_loop": _round(t_block / t_p)}


def _loop_times(row: Row, base: Row) -> tuple[float, float, float] | None:
    """Seconds of the mean decoding call: drafter and verifier block in ``row``, verifier in
    ``base``; None without the hooks' timings."""
    a, b = row.extra.get("decode_calls"), base.extra.get("decode_calls")
    if a is None or b is None or not a.get("drafter", [0])[0] or not b["verifier"][0]:
        return None
    return (a["drafter"][1] / a["drafter"][0], a["verifier"][1] / a["verifier"][0],
            b["verifier"][1] / b["verifier"][0])


def _decode_speed(row: Row) -> float:
    """Tokens per second of the decoding alone: the wall time less the prompts' prefill."""
    return row.tokens / (row.wall_s - row.extra["prefill_s"])


def _ratio_range(row: Row, other: Row):
    """``[lowest, highest]`` over the rounds of row's speed / other's speed in the same round
    (None for a single round)."""
    a = row.extra.get("round_tokens_per_s") or []
    b = other.extra.get("round_tokens_per_s") or []
    if len(a) < 2 or len(a) != len(b):
        return None
    ratios = [x / y for x, y in zip(a, b)]
    return [_round(min(ratios)), _round(max(ratios))]


def _round(x, n=3):
    return None if x is None else round(float(x), n)


def greedy_agreement(result: dict) -> dict:
    """How many greedy prompts' outputs equal the verifier's greedy output (ours), exactly."""
    rows = {(r.name, r.batch): r for r in result["rows"]}
    ref = rows.get(("ours:verifier", 1))
    if ref is None:
        return {}
    out = {}
    for (name, batch), r in rows.items():
        if "greedy" in name and ("spec" in name or name.startswith("hf:")):
            same = sum(a == b for a, b in zip(r.extra["outputs"], ref.extra["outputs"]))
            out[f"{name} (batch {batch})"] = f"{same}/{len(ref.extra['outputs'])}"
    return out


def markdown(result: dict) -> str:
    s = summarize(result)
    ratios = ["vs_ours_verifier", "vs_hf_verifier", "vs_hf_assisted"]
    if any("vs_hf_defaults" in d for d in s):
        ratios.append("vs_hf_defaults")
    if any("vs_ours_verifier_range" in d for d in s):  # each ratio with its range over the rounds
        ratios = [c + " (range)" for c in ratios]
    extra = ["drafter_steps_per_block"] if any("drafter_steps_per_block" in d for d in s) else []
    cols = (["name", "batch", "tokens_per_s", "tokens_per_verifier_call", "acceptance_rate"]
            + ratios + ["predicted", "efficiency", "c_loop"] + extra
            + ["predicted_loop", "decode_efficiency", "non_model_share"])
    if any("peak_rss_mib" in d for d in s):
        cols.append("peak_rss_mib")

    def cell(d, c):
        if c.endswith(" (range)"):
            c = c[: -len(" (range)")]
            if d.get(c) is None:
                return ""
            lo, hi = d.get(c + "_range") or (None, None)
            return f"{d[c]} ({lo}–{hi})" if lo is not None else str(d[c])
        return "" if d.get(c) is None else str(d.get(c))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for d in s:
        lines.append("| " + " | ".join(cell(d, c) for c in cols) + " |")
    if result["settings"].get("weights") == "random":
        lines.append("")
        lines.append("Random weights of the pair's shapes: the models disagree, so acceptance, "
                     "tokens per verifier call and the speed-ups of speculation are not "
                     "meaningful; what compares is the time per verifier call and per drafter "
                     "step of each engine (the ratios of the rows at about one token per call).")
    if any(r.name == VERIFIER_T1 for r in result["rows"]):
        lines.append("")
        lines.append(f"vs_ours_verifier, and the in-loop verifier step: against {VERIFIER_T1} "
                     "(same batch) for the other T = 1 rows, against ours:verifier (greedy) for "
                     "the rest; vs_hf_verifier is against HF's greedy verifier for every row.")
    rounds = result["settings"].get("rounds", 1)
    if rounds > 1:
        lines.append("")
        lines.append(f"{rounds} rounds, interleaved (every other round in reverse order); "
                     "figures are totals over the rounds, ranges are the lowest and highest "
                     "per-round ratio; step costs are medians over the rounds.")
        differ = [f"{r.name} (batch {r.batch})" for r in result["rows"]
                  if r.extra.get("rounds_differ")]
        if differ:
            lines.append("Decoded different tokens in different rounds: " + ", ".join(differ)
                         + ".")
    lines.append("")
    quant, mem = result["settings"].get("quant"), result.get("memory") or {}
    if quant or mem:
        lines.append(f"Weights: {quant or 'bf16'}."
                     + (f" Peak resident memory of the process: {mem['peak_rss_mib']:.0f} MiB "
                        f"(VmHWM), {mem['rss_mib']:.0f} MiB at the end." if mem else "")
                     + (" peak_rss_mib: a configuration's own peak (VmHWM restarted before each"
                        " of its runs: what was resident then, the loaded models among it, plus"
                        " what the run allocated; the largest over the rounds)."
                        if any("peak_rss_mib" in d for d in s) else ""))
    for what, c in (("drafter", result["costs"]), ("int8 drafter", result["costs"].get("int8")),
                    ("compiled drafter", result["costs"].get("compiled"))):
        if c is not None:
            lines.append(f"Step costs at the first prompt's context ({what}): drafter step "
                         f"{c['t_q_s'] * 1e3:.1f} ms, verifier step {c['t_p_s'] * 1e3:.1f} ms, "
                         f"verifier call on gamma+1 tokens {c['t_p_block_s'] * 1e3:.1f} ms: "
                         f"c = {c['c']:.3f}, r = {c['r']:.3f}.")
    loops = [(d["name"], d) for d in summarize(result) if "c_loop" in d]
    if loops:
        lines.append("In-loop step costs (mean decoding call at batch 1, ms; the verifier block "
                     "call scores gamma + 1 tokens, fewer in blocks cut by draft confidence; the "
                     "verifier step from the row's vs_ours_verifier baseline): " + "; ".join(
                         f"{name}: drafter {d['t_q_loop_ms']:.1f}, verifier block call "
                         f"{d['t_p_block_loop_ms']:.1f}, verifier step {d['t_p_loop_ms']:.1f} "
                         f"(c = {d['c_loop']:.3f}, r = {d['r_loop']:.3f})" for name, d in loops)
                     + ".")
    agree = greedy_agreement(result)
    if agree:
        lines.append("Greedy outputs equal to our verifier-alone greedy output: "
                     + ", ".join(f"{k}: {v}" for k, v in agree.items()) + ".")
    return "\n".join(lines)


def from_json(text: str) -> dict:
    """A result written by :func:`to_json`, ready for :func:`markdown` again."""
    data = json.loads(text)
    rows = []
    for d in data["rows"]:
        d = {k: v for k, v in d.items() if k != "tokens_per_s"}
        rows.append(Row(**d))
    return {"rows": rows, "costs": data["costs"], "settings": data["settings"],
            "machine": data["machine"], "memory": data.get("memory", {})}


def to_json(result: dict) -> str:
    rows = []
    for r in result["rows"]:
        d = asdict(r)
        d["tokens_per_s"] = r.tokens_per_s
        rows.append(d)
    return json.dumps({"rows": rows, "summary": summarize(result), "costs": result["costs"],
                       "settings": result["settings"], "machine": result["machine"],
                       "memory": result.get("memory", {}),
                       "greedy_agreement": greedy_agreement(result)}, indent=1)
