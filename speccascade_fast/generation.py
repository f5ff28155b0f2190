"""The front door: :func:`generate` decodes prompts with a drafter/verifier pair, on the batched
:class:`~speccascade_fast.engine.Engine` where it runs and on the sequential loops
(:mod:`speccascade_fast.sequential`) otherwise. Both take the same validated
:class:`~speccascade_fast.config.DecodeConfig` and inputs (:mod:`speccascade_fast.inputs`), and
emit the same tokens for the same seeds.
"""
from __future__ import annotations

import time

import torch

from . import engine as batched
from . import inputs, model_facts, outputs, sequential
from .config import (
    DEFAULT_ALPHA,
    DEFAULT_MAX_DRAFTER_RUN,
    DEFAULT_RULE,
    DEFAULT_SEQ_ALPHA,
    METHODS,
    DecodeConfig,
)
from .outputs import GenerateOutput

ENGINES = ("auto", "static", "sequential")


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
    min_p: float | None = None,
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
    logits_processor=None,
    gamma_policy="fixed",
    exact_prefix: int = 0,
    divergence_budget: float | None = None,
    calibration=None,
    on_tokens=None,
    stop_condition=None,
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
            ``seq_cascade``, :data:`DEFAULT_SEQ_ALPHA` (:mod:`speccascade_fast.config`).
        gamma: drafts per verifier call (>= 1); with ``draft_confidence``, the most.
        temperature, top_k, top_p: as in :func:`speccascade_fast.verify` (T = 0: greedy).
        min_p: None, or Hugging Face's min-p truncation (after top-k / top-p; in (0, 1]): keep
            the tokens whose probability is at least ``min_p`` times the largest. Methods that
            sample one model only (``autoregressive``, ``drafter_only``), on either engine.
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
        logits_processor: None or ``logits_processor(ids [1, L], logits [1, V]) -> logits``
            (Hugging Face's ``LogitsProcessor`` signature, e.g. a ``LogitsProcessorList``):
            applied to the drafter's and the verifier's logits alike at every position, with
            the sequence before it, so the emitted law is the processed verifier's. Decodes on
            the sequential loops (one sequence at a time).
        gamma_policy: ``"fixed"`` (every block drafts ``gamma``), ``"goodput"`` (each block's
            gamma, at most ``gamma``, chosen to maximise expected tokens per second from the
            measured block times and each row's acceptance so far; :mod:`speccascade_fast.goodput`),
            ``"goodput_confidence"`` (the same with each row's acceptance predicted from the
            drafter's confidence at its last verified drafts, calibrated online) or a schedule
            ``f(block_index, batch_size) -> gamma``. The batched Engine only; the chosen gammas
            are in ``stats["gammas"]``, with a goodput policy each acceptance predictor's
            log-loss in ``stats["acceptance_log_loss"]``.
        exact_prefix: ``spec_cascade``: the first ``exact_prefix`` emitted tokens of every
            response keep the verifier's law exactly (a block that starts inside the prefix is
            verified with the lossless ``spec``), whatever the rule: e.g. the opening of a
            reply, where lenient verification helps jailbreaks most.
        divergence_budget: ``spec_cascade``: None, or the total variation distance B >= 0
            each response may spend (docs/semantics.md §9): while a response has budget left
            the rule decides as usual; a position whose cost ``TV(pi, pT)`` would take it past
            B is verified losslessly. The law of every response is then within total variation
            B of the verifier's own (0: ``spec``; ``inf``: the plain rule). What each sequence
            spent is in ``stats["per_sequence"][b]["divergence_spent"]``. It bounds the distance
            to the verifier's law, not a task's accuracy.
        calibration: None, or a calibration file written by ``speccascade calibrate`` (or its
            :class:`~speccascade_fast.calibration.Calibration`): it sets ``method``, ``rule``
            and ``alpha`` (the lenience chosen for a quality target on a task); ``alpha`` must
            then be left unset, ``rule`` unset or the file's (docs/evaluation.md).
        on_tokens: None or ``on_tokens(b, tokens)``, called each time sequence b emits tokens
            (after every verification block or step, in order: exactly the tokens its output
            gains), e.g. to stream them.
        stop_condition: None or ``stop_condition(b, new_tokens) -> bool``, asked after every
            emitted token with all of sequence b's new tokens so far: True ends the sequence at
            that token, as an EOS would (HF's stopping criteria, stop strings).

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
    hooks = outputs.Hooks(on_tokens, stop_condition)
    cfg = DecodeConfig(method=method, rule=rule, alpha=alpha, gamma=gamma,
                       temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       bonus=bonus, max_drafter_run=max_drafter_run, seq_score=seq_score,
                       backend=backend, draft_confidence=draft_confidence,
                       logits_processor=logits_processor,
                       gamma_policy=gamma_policy, exact_prefix=exact_prefix,
                       divergence_budget=divergence_budget, calibration=calibration)
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is not known; choose one of {', '.join(ENGINES)}")
    drafter, verifier = model_facts.check_pair(method, model_facts.loaded(drafter),
                                               model_facts.loaded(verifier))
    main = verifier if verifier is not None else drafter
    prompts, input_ids = inputs.prompts(input_ids, attention_mask)
    budget = inputs.budgets(max_new_tokens, 1, per_sequence=False)[0]
    inputs.check_context((("drafter", drafter), ("verifier", verifier)), prompts, budget)
    seeds = inputs.seeds(seed, len(prompts))
    eos = inputs.eos_ids(eos_token_id, verifier, drafter)
    pad = inputs.pad_id(pad_token_id, main, eos)
    inputs.check_vocab(prompts, eos, pad, model_facts.vocab_size(main))
    device = model_facts.device(main)

    if engine != "sequential":
        if cfg.logits_processor is not None:
            if engine == "static":
                raise ValueError("engine='static' cannot run a logits_processor (it runs on the "
                                 "sequential loops); use engine='auto' or 'sequential'")
        elif batched.supports(method, drafter, verifier, attention=attention):
            longest = max(p.numel() for p in prompts)
            eng = batched.Engine(drafter, verifier, config=cfg, max_batch_size=len(prompts),
                                 max_seq_len=longest + budget, cuda_graphs=cuda_graphs,
                                 attention=attention)
            out = eng.generate(input_ids, attention_mask, max_new_tokens=budget, seed=seeds,
                               eos_token_id=sorted(eos), pad_token_id=pad, on_tokens=on_tokens,
                               stop_condition=stop_condition)
            out.stats["wall_s"] = time.perf_counter() - start
            out.stats["tokens_per_s"] = out.stats["tokens"] / out.stats["wall_s"]
            return out
        if engine == "static":
            why = [w for w in (batched.unsupported_reason(m, attention)
                               for m in (drafter, verifier)) if w]
            raise ValueError(f"engine='static' cannot run method={method!r} here: "
                             f"{why[0] if why else 'it runs ' + ', '.join(batched.METHODS)}")
    for name, value in (("cuda_graphs", cuda_graphs), ("attention", attention),
                        ("gamma_policy", None if gamma_policy == "fixed" else gamma_policy)):
        if value:
            raise ValueError(f"{name}={value!r} needs the batched Engine, which does not run "
                             f"method={method!r} with engine={engine!r} on these models")

    new_tokens, decoder_outputs, counters = sequential.run(cfg, drafter, verifier, prompts, seeds,
                                                           budget, eos, device, hooks)
    sequences = outputs.sequences(input_ids.to(device), new_tokens, pad, decoder_outputs)
    return GenerateOutput(sequences, outputs.final_stats(counters, cfg.settings(), start),
                          new_tokens)


__all__ = ["DEFAULT_ALPHA", "DEFAULT_RULE", "DEFAULT_SEQ_ALPHA", "ENGINES", "GenerateOutput",
           "METHODS", "generate"]
