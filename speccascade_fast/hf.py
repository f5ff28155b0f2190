"""Hugging Face's ``generate`` vocabulary on top of :func:`speccascade_fast.generate`.

``generate(model, input_ids, assistant_model=drafter, do_sample=..., ...)`` takes the arguments a
user of HF assisted generation already writes and maps them:

==========================  =================================================================
HF argument                 engine argument
==========================  =================================================================
``model``                   ``verifier``
``assistant_model``         ``drafter`` (None: plain decoding with ``model``, method
                            ``autoregressive``)
``do_sample=False``         ``temperature=0`` (greedy; ``top_k``/``top_p`` are then moot)
``do_sample=True``          ``temperature``, ``top_k``, ``top_p`` as given
``num_assistant_tokens``    ``gamma``
``deferral_rule``           ``rule`` (None: the method's default, ``token_v3`` for the default
                            method ``spec_cascade``)
``lenience``                ``alpha`` (None: :data:`speccascade_fast.config.DEFAULT_ALPHA`)
``max_new_tokens``          ``max_new_tokens``
``eos_token_id``,           as in the engine (None: the model's generation config)
``pad_token_id``
``seed``                    ``seed`` (sequence b uses ``seed + b``)
==========================  =================================================================

``assistant_confidence_threshold`` becomes ``draft_confidence``: a fixed cut-off (None or 0:
off, the default here). HF's own default is 0.4 with up to 20 drafts, and HF re-fits the
threshold during generation when scikit-learn is installed; this engine does not.

``method``, ``bonus``, ``max_drafter_run``, ``seq_score`` and ``backend`` pass through. Other HF
arguments (logits processors, stopping criteria, streamers, ...) are not supported; a non-None one
triggers a warning naming it. Model ``generation_config`` sampling defaults are NOT read here
(the ``custom_generate`` entry point in ``custom_generate/generate.py`` does read them).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from transformers.generation.utils import GenerateDecoderOnlyOutput

from .generation import generate as engine_generate

_PASS_THROUGH = ("method", "bonus", "max_drafter_run", "seq_score", "backend", "pad_token_id")
# HF arguments that carry no meaning here and are silently ignored when given
_SILENT = frozenset({
    "use_cache", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
    "generation_config", "synced_gpus", "inputs", "kwargs", "model",
})


@dataclass
class CascadeGenerateOutput(GenerateDecoderOnlyOutput):
    """HF's ``GenerateDecoderOnlyOutput`` (``sequences`` [B, L]; scores etc. are None) plus
    ``stats`` (the engine's counters, see :mod:`speccascade_fast.stats`) and ``new_tokens``."""

    stats: dict | None = None
    new_tokens: list | None = None


def generate(model, input_ids=None, attention_mask=None, *, assistant_model=None,
             do_sample: bool = False, temperature: float | None = 1.0, top_k: int | None = None,
             top_p: float | None = None, max_new_tokens: int | None = 20,
             num_assistant_tokens: int | None = 5,
             assistant_confidence_threshold: float | None = None,
             deferral_rule: str | None = None,
             lenience: float | None = None, eos_token_id=None, seed: int = 0,
             return_dict_in_generate: bool = True, **unused):
    """Speculative-cascade decoding with HF's argument names (see the module docstring).

    Args:
        model: the verifier, an HF causal (or encoder-decoder) LM.
        input_ids: int64 ``[B, P]``; ``inputs`` (HF's positional name) is accepted too.
        attention_mask: ``[B, P]`` for left-padded batches.
        assistant_model: the drafter (same vocabulary) or None.

    Returns:
        :class:`CascadeGenerateOutput` (``.sequences`` [B, P + new], ``.stats``), or the
        ``sequences`` tensor alone when ``return_dict_in_generate=False``.

    Example:
        >>> out = generate(verifier, **tok("def fib(n):", return_tensors="pt"),
        ...                assistant_model=drafter, do_sample=False, max_new_tokens=64)
        >>> tok.decode(out.sequences[0]), out.stats["tokens_per_verifier_call"]
    """
    if input_ids is None:
        input_ids = unused.pop("inputs", None)
    if input_ids is None:
        raise ValueError("input_ids is required (the prompt token ids, [B, P])")
    extra = {k: unused.pop(k) for k in _PASS_THROUGH if unused.get(k) is not None}
    ignored = sorted(k for k, v in unused.items() if v is not None and k not in _SILENT)
    if ignored:
        warnings.warn(f"speccascade_fast.hf.generate ignores these arguments: {', '.join(ignored)}",
                      stacklevel=2)
    greedy = not do_sample
    if assistant_model is None:
        extra.setdefault("method", "autoregressive")
    out = engine_generate(
        assistant_model, model, input_ids,
        rule=deferral_rule,
        alpha=lenience,
        gamma=5 if num_assistant_tokens is None else num_assistant_tokens,
        temperature=0.0 if greedy else (1.0 if temperature is None else temperature),
        top_k=None if greedy else top_k,
        top_p=None if greedy else top_p,
        max_new_tokens=20 if max_new_tokens is None else max_new_tokens,
        eos_token_id=eos_token_id,
        attention_mask=attention_mask,
        seed=seed,
        draft_confidence=assistant_confidence_threshold or None,
        **extra,
    )
    if not return_dict_in_generate:
        return out.sequences
    return CascadeGenerateOutput(sequences=out.sequences, stats=out.stats,
                                 new_tokens=out.new_tokens)


__all__ = ["CascadeGenerateOutput", "generate"]
