"""Quantised weights on the CPU: ``load_model(spec, weights="bf16" | "int8" | "q4" | "q4a8")``.

* ``q4``: for a model that comes from a GGUF file (the default Qwen2.5-Coder pair, SmolLM2, any
  ``.gguf`` path), the file's own quantised blocks, each tensor in its GGUF block type: Q4_K
  (and Q4_0/Q4_1) as 4-bit codes with their 6-bit group scales and minimums, Q5_0/Q5_1/Q5_K
  and Q6_K as 5- and 6-bit codes (a nibble plus one or two bit planes, as ggml stores them) and
  Q8_0 as 8-bit codes, with their group scales. The kernels de-quantise them to exactly the
  fp32 weights of ggml's reference de-quantisation (no rounding of scales: they are kept as the
  file's fp16 factors times small integers). For a model without a GGUF file, 4-bit
  round-to-nearest in groups of 32 (:func:`speccascade_fast.quant.formats.rtn4`).
* ``q4a8``: ``q4``'s weights, multiplied in the manner of llama.cpp: each activation row
  quantised to int8 per block of 32 inputs (scale absmax / 127) and the groups' dot products in
  integers (AVX-512 VNNI or AVX2 + FMA), up to 16 rows per call (decoding and verification
  blocks; a prompt's prefill takes ``q4``'s path). Faster than ``q4`` on a decoding step; its logits differ from
  ``q4``'s by the activations' rounding.
* ``int8``: every linear layer in int8 with one scale per output channel (absmax / 127) from the
  dense (bf16) weights; embeddings stay dense.
* ``bf16``: the dense model (the GGUF de-quantised once to bf16).

Decoding stays exact: the verification guarantees hold for the distributions the quantised
models report. See :mod:`speccascade_fast.quant` for the formats, kernels and loading, and
docs/benchmarks.md for speed and memory.

:func:`int8_weight_only` (with :class:`Int8Linear`, PyTorch's ``aten._weight_int8pack_mm``)
converts an already loaded model in place; it is what ``speccascade bench --int8-drafter`` uses.
:func:`quantize_model` does the same with this package's modules (``int8`` or ``q4`` as
round-to-nearest).
"""
from __future__ import annotations

import torch
from torch import nn

from .quant.formats import QuantizedWeight
from .quant.load import WEIGHTS, check_weights, load_quantized, quantize_linears
from .quant.modules import QuantEmbedding, QuantLinear


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


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not targets:
        raise ValueError("the model has no nn.Linear layers to quantise")
    return targets


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def int8_weight_only(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by :class:`Int8Linear`; returns it.

    The model must live on the CPU or a CUDA device in fp32/bf16/fp16. Tied weights (an LM head
    sharing the embedding matrix) are untied: the embedding stays as it was, the head is int8.
    """
    for name, linear in _linears(model):
        _replace(model, name, Int8Linear(linear))
    if hasattr(model, "config"):
        model.config.tie_word_embeddings = False
    return model


def quantize_model(model: nn.Module, weights: str) -> nn.Module:
    """Replace (in place) every ``nn.Linear`` of a loaded CPU model whose input size is a
    multiple of 32 by a :class:`QuantLinear`: ``"int8"`` per output channel, ``"q4"`` 4-bit
    round-to-nearest in groups of 32, ``"q4a8"`` the same with int8 activations (``"bf16"``:
    the model unchanged). Returns the model.
    (:func:`speccascade_fast.models.load_model` with ``weights=`` loads GGUF blocks instead,
    and never holds the dense copy.)"""
    return quantize_linears(model, weights)


__all__ = ["Int8Linear", "QuantEmbedding", "QuantLinear", "QuantizedWeight", "WEIGHTS",
           "check_weights", "int8_weight_only", "load_quantized", "quantize_model"]
