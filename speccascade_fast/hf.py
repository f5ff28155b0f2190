"""Hugging Face's ``generate`` contract on top of :func:`speccascade_fast.generate`.

``generate(model, input_ids, assistant_model=drafter, ...)`` takes what a user of HF assisted
generation writes, and the ``custom_generate/`` folder makes it ``model.generate(...,
custom_generate=<folder>, trust_remote_code=True)``. It behaves like HF's ``generate``:

* the settings come from ``generation_config`` (the argument, else the model's), updated by the
  keyword arguments, as in HF. Every field the engine supports keeps HF's meaning: ``do_sample``,
  ``temperature``, ``top_k`` (0: off), ``top_p`` (1.0: off), ``max_new_tokens``, ``max_length``,
  ``min_new_tokens``, ``eos_token_id``, ``pad_token_id``, ``repetition_penalty``, ``min_p``,
  ``num_assistant_tokens`` (gamma), ``assistant_confidence_threshold`` (``draft_confidence``),
  ``stop_strings`` (with ``tokenizer=``), ``return_dict_in_generate``. Any other field set to a
  non-default value raises a ValueError naming it: a silently different law would be worse.
  Output-only flags that are not produced (``output_scores``, ``output_logits``, ...) warn once;
* ``repetition_penalty``, ``min_new_tokens``, ``min_p`` and a ``logits_processor`` list change
  the law: they are applied to the drafter's and the verifier's logits alike at every position
  (the sequential loops, one sequence at a time), so the output law is HF's processed law;
* ``stopping_criteria`` (and ``stop_strings``) end a sequence at the token where they first fire;
* ``streamer`` gets ``put(prompt)``, then ``put(tokens)`` after every verification block (the
  accepted tokens, in order), then ``end()``, also when generation stops early or raises;
* ``seed`` (not an HF argument) defaults to None: each call draws its engine seed from torch's
  global generator, so ``transformers.set_seed`` makes a call reproducible; an explicit seed is
  exactly reproducible and batch-invariant (sequence b uses ``seed + b``);
* returns a ``LongTensor`` unless ``return_dict_in_generate``, then a
  :class:`CascadeGenerateOutput` (HF's ``GenerateDecoderOnlyOutput`` plus ``stats``).

Beyond HF: a batch of several prompts works with an assistant (HF's assisted generation takes one
prompt). The cascade's own settings are extra keyword arguments: ``deferral_rule`` (``rule``;
None: the method's default, ``token_v3``), ``lenience`` (``alpha``; None:
:data:`speccascade_fast.config.DEFAULT_ALPHA`), ``method``, ``bonus``, ``max_drafter_run``,
``seq_score``, ``backend``, ``engine``, ``gamma_policy``, ``exact_prefix``. Without
``assistant_model`` the verifier decodes alone.
Drafting schedule: ``num_assistant_tokens`` and ``assistant_confidence_threshold`` fall back to
the assistant's generation config where it sets them, else gamma 5 and no cut-off (HF's own
defaults, 20 and 0.4, are not implied: this engine does not re-fit the threshold).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .generation import generate as engine_generate

#: cascade settings passed through to :func:`speccascade_fast.generate`
_PASS_THROUGH = ("method", "bonus", "max_drafter_run", "seq_score", "backend", "engine",
                 "gamma_policy", "exact_prefix")
#: generation-config fields read here (their HF meaning is implemented)
_SUPPORTED = frozenset({
    "do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "max_length",
    "min_new_tokens", "eos_token_id", "pad_token_id", "repetition_penalty", "min_p",
    "num_assistant_tokens", "assistant_confidence_threshold", "stop_strings",
    "return_dict_in_generate",
})
#: fields that do not change the output of a decoder-only, no-beam generate
_HARMLESS = frozenset({
    "_from_model_config", "transformers_version", "bos_token_id", "decoder_start_token_id",
    "use_cache", "cache_implementation", "cache_config", "compile_config", "disable_compile",
    "is_assistant", "num_assistant_tokens_schedule", "prefill_chunk_size", "max_cache_len",
    "length_penalty", "early_stopping", "low_memory", "renormalize_logits",
    "remove_invalid_values",
})
#: output-only flags: not produced here (warned about once)
_OUTPUT_FLAGS = ("output_scores", "output_logits", "output_attentions", "output_hidden_states")
#: ``generate`` arguments that must be left unset
_UNSUPPORTED_ARGS = ("prefix_allowed_tokens_fn", "negative_prompt_ids",
                     "negative_prompt_attention_mask")
_warned: set[str] = set()


@dataclass
class CascadeGenerateOutput(GenerateDecoderOnlyOutput):
    """HF's ``GenerateDecoderOnlyOutput`` (``sequences`` [B, L]; scores etc. are None) plus
    ``stats`` (the engine's counters, see :mod:`speccascade_fast.stats`) and ``new_tokens``."""

    stats: dict | None = None
    new_tokens: list | None = None


def generate(model, input_ids=None, attention_mask=None, *, assistant_model=None,
             generation_config: GenerationConfig | None = None, logits_processor=None,
             stopping_criteria=None, streamer=None, tokenizer=None, seed: int | None = None,
             deferral_rule: str | None = None, lenience: float | None = None,
             synced_gpus=None, **kwargs):
    """Speculative-cascade decoding with HF's ``generate`` contract (see the module docstring).

    Args:
        model: the verifier, an HF causal (or encoder-decoder) LM.
        input_ids: int64 ``[B, P]``; ``inputs`` (HF's positional name) is accepted too.
        attention_mask: ``[B, P]`` for left-padded batches.
        assistant_model: the drafter (same vocabulary) or None (plain decoding with ``model``).
        generation_config, logits_processor, stopping_criteria, streamer, tokenizer: as in HF.
        seed: None (drawn from torch's global generator) or an int.
        deferral_rule, lenience: the cascade's rule and alpha.
        kwargs: generation-config fields (as in HF) and the cascade settings ``method``,
            ``bonus``, ``max_drafter_run``, ``seq_score``, ``backend``, ``engine``.

    Returns:
        The ``sequences`` LongTensor, or with ``return_dict_in_generate`` a
        :class:`CascadeGenerateOutput` (``.sequences``, ``.stats``, ``.new_tokens``).

    Example:
        >>> out = generate(verifier, **tok("def fib(n):", return_tensors="pt"),
        ...                assistant_model=drafter, do_sample=False, max_new_tokens=64)
        >>> tok.decode(out[0])
    """
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    else:
        kwargs.pop("inputs", None)
    if input_ids is None:
        raise ValueError("input_ids is required (the prompt token ids, [B, P])")
    if synced_gpus:
        raise ValueError("synced_gpus=True is not supported (one process decodes the batch)")
    for name in _UNSUPPORTED_ARGS:
        if kwargs.pop(name, None) is not None:
            raise ValueError(f"{name} is not supported by speculative-cascade generate")
    kwargs.pop("use_model_defaults", None)
    extra = {k: kwargs.pop(k) for k in _PASS_THROUGH if kwargs.get(k) is not None}
    for k in _PASS_THROUGH:
        kwargs.pop(k, None)

    config = copy.deepcopy(generation_config if generation_config is not None
                           else model.generation_config)
    unknown = config.update(**kwargs)
    if unknown:
        raise ValueError(f"unknown generate arguments: {', '.join(sorted(unknown))} (not "
                         f"generation-config fields nor cascade settings)")
    _check_fields(config)
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    B, P = ids.shape if ids.dim() == 2 else (None, None)

    greedy = not config.do_sample
    temperature = 0.0 if greedy else (1.0 if config.temperature is None else config.temperature)
    top_k = None if greedy or not config.top_k else config.top_k  # 0: off (HF)
    top_p = None if greedy or config.top_p is None or config.top_p >= 1.0 else config.top_p
    min_p = None if greedy else config.min_p

    if config.max_new_tokens is not None:
        max_new_tokens = config.max_new_tokens
    elif config.max_length is not None:
        max_new_tokens = config.max_length - (P or 0)
        if max_new_tokens < 1:
            raise ValueError(f"max_length={config.max_length} leaves no room for new tokens after "
                             f"the {P}-token input; set max_new_tokens or a larger max_length")
    else:
        max_new_tokens = 20  # HF's default max_length
    eos = config.eos_token_id
    if isinstance(eos, torch.Tensor):
        eos = eos.flatten().tolist()
    eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.min_new_tokens and eos_list:
        processors.append(MinNewTokensLengthLogitsProcessor(
            P, config.min_new_tokens, eos_list, device=ids.device))
    if logits_processor:
        processors.extend(logits_processor)
    if processors or min_p is not None:
        # the truncations follow the processors (HF's order: processors, then warpers)
        processors.append(_Truncation(temperature, top_k, top_p, min_p))
        top_k = top_p = None

    criteria = StoppingCriteriaList(stopping_criteria or [])
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError("stop_strings needs tokenizer= (HF's StopStringCriteria reads the "
                             "vocabulary)")
        criteria.append(StopStringCriteria(tokenizer, config.stop_strings))
    stop_condition = None
    if criteria:
        def stop_condition(b, new_tokens):
            row = torch.cat([ids[b].cpu(), torch.tensor(new_tokens, dtype=ids.dtype)])[None]
            return bool(criteria(row, None).any())

    gamma = _assistant_setting("num_assistant_tokens", kwargs, generation_config, assistant_model)
    threshold = _assistant_setting("assistant_confidence_threshold", kwargs, generation_config,
                                   assistant_model)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # torch's global generator
    if assistant_model is None:
        extra.setdefault("method", "autoregressive")

    on_tokens = None
    if streamer is not None:
        streamer.put(ids.cpu())  # HF's own streamers raise here for batch > 1
        if B != 1:
            raise ValueError(f"a streamer takes one sequence: batch size 1 only, got {B}")

        def on_tokens(b, tokens):
            streamer.put(torch.tensor(tokens, dtype=torch.long))
    try:
        out = engine_generate(
            assistant_model, model, input_ids,
            rule=deferral_rule, alpha=lenience, gamma=5 if gamma is None else gamma,
            temperature=temperature, top_k=top_k, top_p=top_p,
            max_new_tokens=max_new_tokens, eos_token_id=eos_list, pad_token_id=config.pad_token_id,
            attention_mask=attention_mask, seed=seed, draft_confidence=threshold or None,
            logits_processor=processors or None, on_tokens=on_tokens,
            stop_condition=stop_condition, **extra)
    finally:
        if streamer is not None:
            streamer.end()
    if not config.return_dict_in_generate:
        return out.sequences
    return CascadeGenerateOutput(sequences=out.sequences, stats=out.stats,
                                 new_tokens=out.new_tokens)


class _Truncation:
    """HF's warpers top-k, top-p and min-p on the tempered logits (HF's order), applied as a mask
    on the untempered ones: the engine then applies the temperature itself. Greedy: nothing."""

    def __init__(self, temperature, top_k, top_p, min_p):
        self.temperature = temperature
        self.warpers = [w for w in (
            TopKLogitsWarper(top_k) if top_k else None,
            TopPLogitsWarper(top_p) if top_p is not None else None,
            MinPLogitsWarper(min_p) if min_p is not None else None) if w is not None]

    def __call__(self, input_ids, scores):
        if self.temperature == 0 or not self.warpers:
            return scores
        tempered = scores / self.temperature
        for w in self.warpers:
            tempered = w(input_ids, tempered)
        return scores.masked_fill(tempered == float("-inf"), float("-inf"))


def _check_fields(config: GenerationConfig) -> None:
    """ValueError for a field set to a non-default value whose meaning is not implemented; one
    warning per output-only flag that is not produced."""
    default = GenerationConfig().to_dict()
    for name, value in config.to_dict().items():
        if name in _SUPPORTED or name in _HARMLESS or value == default.get(name):
            continue
        if name in _OUTPUT_FLAGS:
            if value and name not in _warned:
                _warned.add(name)
                warnings.warn(f"{name}=True: speculative-cascade generate does not produce it "
                              f"(the output's field stays None)", stacklevel=3)
            continue
        if name in ("num_beams", "num_return_sequences") and value in (None, 1):
            continue
        raise ValueError(f"generation config field {name}={value!r} is not supported by "
                         f"speculative-cascade generate (it would change the output); leave it "
                         f"unset")


def _assistant_setting(name, kwargs, generation_config, assistant_model):
    """``num_assistant_tokens`` / ``assistant_confidence_threshold``: the argument, else the
    given generation config's, else the assistant's generation config's, else None."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    for cfg in (generation_config, getattr(assistant_model, "generation_config", None)):
        value = getattr(cfg, name, None) if cfg is not None else None
        if value is not None:
            return value
    return None


__all__ = ["CascadeGenerateOutput", "generate"]
