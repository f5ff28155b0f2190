#pragma once

// Light header on purpose: only bindings.cpp pulls in torch/extension.h (compile time).
#include <ATen/core/Tensor.h>

namespace speccascade {

// CUDA twin of sample_cpu: logits [R, V] (fp32/fp16/bf16, unit stride along V) and int64
// seeds/positions [R] on one CUDA device; returns int64 [R] on that device.
at::Tensor sample_cuda(const at::Tensor& logits, double temperature,
                          const at::Tensor& seeds, const at::Tensor& positions);

}  // namespace speccascade
