"""What the decoding loops need to know about a Hugging Face model, read in one place: whether it
is an encoder-decoder, its vocabulary and context, its device, the name of its KV-cache argument,
and whether a drafter/verifier pair fits together."""
from __future__ import annotations

import inspect
import os

import torch

from .models import load_model


def loaded(model):
    """``model``, or the model that :func:`speccascade_fast.models.load_model` loads when it is
    given by name or path."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)[0]
    return model


def quantised_weights(model) -> str | None:
    """``"int8"``, ``"q4"`` or ``"q4a8"`` for a model :func:`speccascade_fast.models.load_model` loaded
    with quantised weights, else None."""
    return getattr(getattr(model, "config", None), "speccascade_weights", None)


def is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def text_config(model):
    cfg = model.config
    get = getattr(cfg, "get_text_config", None)
    return get(decoder=True) if get is not None else cfg


def vocab_size(model) -> int:
    """The number of logits the model emits (its LM head's rows, else the config's vocab)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(text_config(model).vocab_size)


def context(model) -> int | None:
    """``max_position_embeddings`` of the (text) config, or None when it has none."""
    limit = getattr(text_config(model), "max_position_embeddings", None)
    return int(limit) if limit else None


def decoder_start_id(model) -> int:
    for src in (getattr(model, "generation_config", None), model.config):
        v = getattr(src, "decoder_start_token_id", None)
        if v is not None:
            return int(v)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    raise ValueError("the encoder-decoder model has no decoder_start_token_id in its config")


def device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    return next(model.parameters()).device


def accepts(model, name: str) -> bool:
    """Whether ``model.forward`` takes an argument called ``name``."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_kwarg(model) -> str | None:
    """The name under which ``model.forward`` takes its KV cache: ``cache`` (transformers >=
    5.24, which deprecates the old name), ``past_key_values`` (earlier), or None (neither)."""
    for name in ("cache", "past_key_values"):
        if accepts(model, name):
            return name
    return None


def check_pair(method: str, drafter, verifier):
    """The models ``method`` runs on, ``(drafter or None, verifier or None)``: the ones it needs
    must be given, be callable models, share one vocabulary and one architecture family
    (decoder-only or encoder-decoder); the one it does not need is dropped."""
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
        vq, vp = vocab_size(drafter), vocab_size(verifier)
        if vq != vp:
            raise ValueError(f"drafter and verifier vocabularies differ: the drafter's LM head "
                             f"has {vq} outputs, the verifier's {vp}")
        if is_encoder_decoder(drafter) != is_encoder_decoder(verifier):
            raise ValueError("drafter and verifier must both be decoder-only or both "
                             "encoder-decoder models")
    return drafter, verifier
