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
  without an assistant (or with ``method="drafter_only"``) ``min_p`` is the engine's own
  truncation instead, and runs batched;
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
``seq_score``, ``backend``, ``engine``, ``gamma_policy``, ``exact_prefix``,
``divergence_budget``, ``calibration`` (a ``speccascade calibrate`` file in place of
``deferral_rule`` / ``lenience``). Without
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

from . import model_facts
from .generation import generate as engine_generate

#: cascade settings passed through to :func:`speccascade_fast.generate`
_PASS_THROUGH = ("method", "bonus", "max_drafter_run", "seq_score", "backend", "engine",
                 "gamma_policy", "exact_prefix", "divergence_budget", "calibration")
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

    config = _merged_config(generation_config, model)
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
    if not greedy and temperature == 0:
        raise ValueError("temperature=0 with do_sample=True: the temperature must be > 0 when "
                         "sampling (for greedy decoding set do_sample=False), as in HF")
    vocab = model_facts.vocab_size(model)
    # 0 (or the whole vocabulary): no top-k; 1.0: no top-p (HF's warpers are then no-ops)
    top_k = None if greedy or not config.top_k or config.top_k >= vocab else config.top_k
    top_p = None if greedy or config.top_p is None or config.top_p >= 1.0 else config.top_p
    min_p = None if greedy or not config.min_p else config.min_p  # 0: off (HF's no-op)

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
    pad = config.pad_token_id
    if pad is None and eos_list:
        pad = eos_list[0]  # HF pads with the first EOS id when the model names no pad
    encdec = model_facts.is_encoder_decoder(model)

    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.min_new_tokens and eos_list:
        # HF counts new tokens from the (padded) input width, or the decoder's start token
        processors.append(MinNewTokensLengthLogitsProcessor(
            1 if encdec else P, config.min_new_tokens, eos_list, device=ids.device))
    if logits_processor:
        processors.extend(logits_processor)
    if assistant_model is None:
        extra.setdefault("method", "autoregressive")
    if min_p is not None and extra.get("method") not in ("autoregressive", "drafter_only"):
        # a cascade's rules read untruncated distributions and the verification has no min-p:
        # HF's top-k, top-p, min-p (in HF's order) become a mask, and the deferral rules then
        # read the truncated distributions (docs/api.md)
        processors.append(_Truncation(temperature, top_k, top_p, min_p))
        top_k = top_p = min_p = None
    row_processors = _RowProcessors(processors, ids, attention_mask, encdec) if processors \
        else None

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
    if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1):
        raise ValueError(f"num_assistant_tokens must be an int >= 1 (drafts per verifier call), "
                         f"got {gamma!r}")
    if threshold is not None and (isinstance(threshold, bool)
                                  or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold < 1):
        raise ValueError(f"assistant_confidence_threshold must be None or a number in [0, 1) "
                         f"(0: off), got {threshold!r}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # torch's global generator

    on_tokens = None
    if streamer is not None:
        def on_tokens(b, tokens):
            streamer.put(torch.tensor(tokens, dtype=torch.long))
    try:
        if streamer is not None:
            streamer.put(ids.cpu())  # HF's own streamers raise here for batch > 1
            if B != 1:
                raise ValueError(f"a streamer takes one sequence: batch size 1 only, got {B}")
        out = engine_generate(
            assistant_model, model, input_ids,
            rule=deferral_rule, alpha=lenience, gamma=5 if gamma is None else gamma,
            temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
            max_new_tokens=max_new_tokens, eos_token_id=eos_list, pad_token_id=pad,
            attention_mask=attention_mask, seed=seed, draft_confidence=threshold or None,
            logits_processor=row_processors, on_tokens=on_tokens,
            stop_condition=stop_condition, **extra)
    finally:
        if streamer is not None:
            streamer.end()
    if not config.return_dict_in_generate:
        return out.sequences
    return CascadeGenerateOutput(sequences=out.sequences, stats=out.stats,
                                 new_tokens=out.new_tokens)


class _RowProcessors:
    """HF's logits processors as the sequential loops call them: they hand over one unpadded
    sequence (``bind(b)`` says which); HF's processors see the batch's input row as given
    (with its padding) followed by the new tokens, or for encoder-decoder models the decoder
    ids, so the processors count and penalise exactly what they count in HF's ``generate``."""

    def __init__(self, processors, input_ids, attention_mask, encdec: bool):
        self.processors = processors
        self.input_ids = input_ids
        mask = (torch.ones_like(input_ids) if attention_mask is None
                else torch.as_tensor(attention_mask))
        self.prompt_lens = mask.sum(-1).tolist()
        self.encdec = encdec
        self.b = 0

    def bind(self, b: int) -> None:
        self.b = b

    def __call__(self, ids, scores):
        if not self.encdec:
            new = ids[:, self.prompt_lens[self.b]:]
            row = self.input_ids[self.b: self.b + 1].to(device=ids.device, dtype=ids.dtype)
            ids = torch.cat([row, new], dim=1)
        return self.processors(ids, scores)


def _merged_config(generation_config, model) -> GenerationConfig:
    """The generation config as HF builds it: the one given (else the model's), its unset
    fields from the model's, then from HF's global defaults (transformers >= 5.2x sets fields
    to None and fills them at generate time)."""
    own = model.generation_config
    config = copy.deepcopy(generation_config if generation_config is not None else own)
    fill = [own.to_dict()] if generation_config is not None else []
    fill.append(_global_defaults())
    for values in fill:
        for name, value in values.items():
            if not name.startswith("_") and name != "transformers_version" \
                    and value is not None and getattr(config, name, None) is None:
                setattr(config, name, value)
    return config


def _global_defaults() -> dict:
    get = getattr(GenerationConfig, "_get_default_generation_params", None)
    return dict(get()) if get is not None else {}


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
    default, implied = GenerationConfig().to_dict(), _global_defaults()
    for name, value in config.to_dict().items():
        if name in _SUPPORTED or name in _HARMLESS or value == default.get(name) \
                or (name in implied and value == implied[name]):
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
