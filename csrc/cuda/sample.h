// Plain C interface of the CUDA sampler (no torch): bound from csrc/cuda/sample_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of the logits.
enum sc_dtype { SC_FLOAT32 = 0, SC_FLOAT16 = 1, SC_BFLOAT16 = 2 };

// out[r] = drafter sample of row r of `logits` (rows x vocab, row r at logits + r * row_stride
// elements, unit stride along vocab): argmax for temperature == 0, otherwise the counter-based
// Gumbel-max race with u = uniform(seeds[r], positions[r], DRAFT, v). All pointers are device
// pointers. Enqueues on `stream`; returns the launch status.
cudaError_t sc_sample_launch(const void* logits, int dtype, int64_t rows, int64_t vocab,
                             int64_t row_stride, double temperature, const int64_t* seeds,
                             const int64_t* positions, int64_t* out, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
