// Plain C interface of the fused CUDA verification (no torch): bound from csrc/cuda/verify_cuda.cpp.
// The algorithm and its launch structure are described at the top of verify.cu.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "sample.h"  // enum sc_dtype

#ifdef __cplusplus
extern "C" {
#endif

// Largest gamma the kernels take (the accept stage keeps gamma + 1 positions in shared memory).
#define SC_VERIFY_MAX_GAMMA 255

// One padded verification block, all pointers on one CUDA device. Strides are in elements;
// the vocabulary dimension of both logits tensors must have unit stride.
typedef struct sc_verify_args {
  const void* q;  // draft logits [B, rq, V]
  int q_dtype;    // enum sc_dtype
  int64_t q_sb, q_sj;
  const void* p;  // target logits [B, gamma + 1, V]
  int p_dtype;
  int64_t p_sb, p_sj;
  const int64_t* x;  // draft tokens [B, gamma], each in [0, V) (validated by the caller)
  int64_t x_sb, x_sj;
  const double* temperature;  // [B], contiguous, finite, >= 0 (validated by the caller)
  const double* alpha;        // [B], contiguous, in the rule's range (validated by the caller)
  const int64_t* seed;        // [B], contiguous
  const int64_t* positions;   // [B], contiguous
  int64_t B, gamma, rq, V;    // rq = gamma (bonus="verifier") or gamma + 1 (bonus="cascade")
  int rule;                   // index in speccascade_fast.rules.RULES
  // top-k / top-p keep bounds (tau, cut) per row (csrc/keep_bound.h), contiguous float64
  // [B, rq, 2] and [B, gamma + 1, 2], or NULL: no truncation of that model's rows
  const double* q_keep;
  const double* p_keep;
  int64_t* tokens;            // out [B, gamma + 1], contiguous
  int64_t* num_accepted;      // out [B]
  uint8_t* deferred;          // out [B, gamma + 1], contiguous (torch.bool)
} sc_verify_args;

// Bytes of device scratch memory sc_verify_padded_launch needs for these arguments.
size_t sc_verify_workspace_bytes(const sc_verify_args* args);

// Enqueue the whole verification (2 or 3 kernel launches) on `stream`; `workspace` holds at
// least sc_verify_workspace_bytes(args) bytes (256-byte aligned, contents irrelevant). No host
// synchronisation. Returns the launch status.
cudaError_t sc_verify_padded_launch(const sc_verify_args* args, void* workspace,
                                    cudaStream_t stream);

#ifdef __cplusplus
}
#endif
