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

// Number of rules: the rule ids are the indices of speccascade_fast.rules.RULES (verify.cu's enum).
#define SC_VERIFY_NUM_RULES 14

// Largest gamma the kernels take (accept_resample_kernel, which runs the accept and resample
// stages, keeps gamma + 1 positions in shared memory).
#define SC_VERIFY_MAX_GAMMA 255

// One verification block (padded, or ragged: see cu below), all pointers on one CUDA device.
// Strides are in elements; the vocabulary dimension of every logits tensor must have unit stride.
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
  // The ragged layout of verify_ragged (vLLM's flattened rows), or cu = NULL: the padded layout
  // above. With cu, request b has gamma_b = cu[b + 1] - cu[b] drafts (1 <= gamma_b <= gamma:
  // gamma is their maximum; validated by the caller) and q_sb, p_sb, x_sb are unused: its draft
  // rows are q + (cu[b] + j) q_sj, its tokens x[(cu[b] + j) x_sj], its target rows
  // p + (cu[b] + b + j) p_sj (j <= gamma_b), its bonus draft row (bonus="cascade": rq = gamma + 1
  // and qb set; bonus="verifier": rq = gamma and qb NULL) qb + b qb_sb; keep bounds, when given,
  // are q_keep [N, 2], p_keep [N + B, 2], qb_keep [B, 2]. Outputs as above, [B, gamma + 1]: a
  // request's columns past gamma_b + 1 hold token -1 and deferred 0.
  const int64_t* cu;         // [B + 1], contiguous, on the device
  const void* qb;            // bonus draft logits [B, V] (unit stride in V) or NULL
  int qb_dtype;
  int64_t qb_sb;
  const double* qb_keep;     // [B, 2] or NULL
  int64_t* tokens;            // out [B, gamma + 1], contiguous
  int64_t* num_accepted;      // out [B]
  uint8_t* deferred;          // out [B, gamma + 1], contiguous (torch.bool)
  // The divergence budget (docs/semantics.md §9; padded layout only), or budget = NULL: none
  // (then nothing of it runs and spent is not written). budget [B] float64, contiguous, >= 0
  // (inf: unlimited; validated by the caller); spent out [B, gamma + 1] float64, contiguous:
  // each position's charge (0 at positions verified exactly and at a verifier bonus).
  const double* budget;
  double* spent;
} sc_verify_args;

// Bytes of device scratch memory sc_verify_padded_launch needs for these arguments.
size_t sc_verify_workspace_bytes(const sc_verify_args* args);

// Enqueue the whole verification (2 or 3 kernel launches) on `stream`, padded or ragged (args->cu);
// `workspace` holds at least sc_verify_workspace_bytes(args) bytes (256-byte aligned, contents
// irrelevant). No host synchronisation. Returns the launch status.
cudaError_t sc_verify_padded_launch(const sc_verify_args* args, void* workspace,
                                    cudaStream_t stream);

#ifdef __cplusplus
}
#endif
