#pragma once

// Light header on purpose: only bindings.cpp pulls in torch/extension.h (compile time).
#include <ATen/core/Tensor.h>

#include <optional>

namespace speccascade {

// Fused drafter sampling on CPU (see csrc/sample_common.h for the exact definition).
// logits [R, V] float32/float16/bfloat16 with unit stride along V; seeds, positions int64 [R].
// Returns int64 [R].
at::Tensor sample_cpu(const at::Tensor& logits, double temperature,
                         const at::Tensor& seeds, const at::Tensor& positions);

// The same with one temperature per row (a tensor of R entries, or of 1; any float dtype), and
// optionally top-k / top-p as keep bounds [R, 2] float64 (speccascade_fast/truncation.py).
at::Tensor sample_cpu_rowwise(const at::Tensor& logits, const at::Tensor& temperature,
                                 const at::Tensor& seeds, const at::Tensor& positions,
                                 const std::optional<at::Tensor>& keep = std::nullopt);

}  // namespace speccascade
