"""Hugging Face ``custom_generate`` entry point: speculative cascades inside ``model.generate``.

Usage (the folder holding ``custom_generate/`` is a local path or a Hub repo)::

    out = verifier.generate(**inputs, assistant_model=drafter, custom_generate="path/to/repo",
                            trust_remote_code=True, do_sample=False, max_new_tokens=64,
                            deferral_rule="token_v3", lenience=0.3)
    out.sequences, out.stats

transformers calls :func:`generate` below with ``model=<the verifier>`` and every argument given
to ``model.generate``. Sampling settings not passed explicitly come from ``generation_config``
(if given) or ``model.generation_config``, as in HF; ``num_assistant_tokens`` and
``assistant_confidence_threshold`` likewise fall back to ``assistant_model.generation_config``
(where unset there, no cut-off: HF's own default would be 0.4). Everything else is :func:`speccascade_fast.hf.generate`.
"""
from speccascade_fast.hf import generate as _cascade_generate

_FROM_CONFIG = ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "eos_token_id",
                "pad_token_id")
# HF reads the drafting schedule from the assistant's generation config
_FROM_ASSISTANT_CONFIG = ("num_assistant_tokens", "assistant_confidence_threshold")


def generate(model, inputs=None, generation_config=None, assistant_model=None, **kwargs):
    """``model.generate(..., custom_generate=...)`` lands here. Returns an HF-style output with
    ``.sequences`` and ``.stats`` (or the tensor when ``return_dict_in_generate=False``)."""
    input_ids = kwargs.pop("input_ids", None)
    if input_ids is None:
        input_ids = inputs
    config = generation_config if generation_config is not None else model.generation_config
    for name in _FROM_CONFIG:
        if kwargs.get(name) is None and getattr(config, name, None) is not None:
            kwargs[name] = getattr(config, name)
    for name in _FROM_ASSISTANT_CONFIG:
        if kwargs.get(name) is None and assistant_model is not None:
            value = getattr(assistant_model.generation_config, name, None)
            if value is not None:
                kwargs[name] = value
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.setdefault("return_dict_in_generate", True)
    return _cascade_generate(model, input_ids, assistant_model=assistant_model, **kwargs)
