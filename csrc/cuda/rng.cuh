// Device side of the counter-based RNG (docs/semantics.md §6) and the sampler's shared pieces.
// The definitions live in ../rng.h and ../sample_common.h, compiled here as __host__ __device__,
// so the CUDA kernels and the CPU kernels use literally the same code. Plain CUDA C++: no torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../rng.h"
#include "../sample_common.h"

namespace speccascade {

// Warp-wide argmax of (score, id) under `better` (NaN first, then larger, then lower id).
// After the call lane 0 holds the warp's winner.
__device__ __forceinline__ void warp_argmax(double& score, int64_t& idx) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const double s = __shfl_down_sync(0xffffffffu, score, offset);
    const long long i = __shfl_down_sync(0xffffffffu, static_cast<long long>(idx), offset);
    if (better(s, i, score, idx)) {
      score = s;
      idx = i;
    }
  }
}

// Block-wide argmax; every thread of the block gets the winner. `s_score`/`s_idx` are shared
// scratch arrays of at least 32 entries. Must be reached by all threads of the block.
__device__ __forceinline__ void block_argmax(double& score, int64_t& idx, double* s_score,
                                             int64_t* s_idx) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  warp_argmax(score, idx);
  if (lane == 0) {
    s_score[warp] = score;
    s_idx[warp] = idx;
  }
  __syncthreads();
  if (warp == 0) {
    score = lane < warps ? s_score[lane] : -INFINITY;
    idx = lane < warps ? s_idx[lane] : INT64_MAX;
    warp_argmax(score, idx);
    if (lane == 0) {
      s_score[0] = score;
      s_idx[0] = idx;
    }
  }
  __syncthreads();
  score = s_score[0];
  idx = s_idx[0];
  __syncthreads();  // the scratch may be reused right after
}

}  // namespace speccascade
