"""Weight-only int8 models: a cheaper drafter (its cost ratio c bounds every method's speed-up).

:func:`int8_weight_only` replaces every ``nn.Linear`` of a model (the LM head included) by an
:class:`Int8Linear`: int8 weights with one scale per output channel (symmetric, absmax / 127),
multiplied by PyTorch's weight-only int8 kernel (``aten._weight_int8pack_mm``, the kernel
gpt-fast's int8 mode uses) with activations in the model's dtype. Decoding stays exact: the
verification guarantees hold for whatever distribution q the drafter reports, and a quantized
drafter only changes how often its drafts are accepted.
"""
from __future__ import annotations

import torch
from torch import nn


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as int8 ``[out, in]`` times per-row ``scales``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", torch.round(w / scales[:, None]).clamp(-127, 127)
                             .to(torch.int8).contiguous())
        dtype = linear.weight.dtype
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight,
                                               self.scales.to(x.dtype))
        y = y.view(*lead, self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def int8_weight_only(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by :class:`Int8Linear`; returns it.

    The model must live on the CPU or a CUDA device in fp32/bf16/fp16. Tied weights (an LM head
    sharing the embedding matrix) are untied: the embedding stays as it was, the head is int8.
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError("int8_weight_only: the model has no nn.Linear layers")
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear))
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False
    return model


__all__ = ["Int8Linear", "int8_weight_only"]
