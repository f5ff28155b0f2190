// Fused drafter sampling on CUDA: one block per row, block-stride loops over V.
//
// Same algorithm and same fp64 score as the CPU kernel (csrc/cpu/sample_cpu.cpp):
//   1. block argmax of the raw logits (the answer for T == 0; NaN and all -inf rows end here),
//   2. the exact score of that entry seeds every thread's running best,
//   3. each thread scans its entries, skipping those whose bound l / T + G[bucket] cannot reach
//      its best (G in shared memory), evaluating the two fp64 logs only for the rest,
//   4. block argmax of the per-thread winners (warp shuffles, then one warp over the warps).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "rng.cuh"
#include "sample.h"

namespace speccascade {
namespace {

constexpr int kThreads = 512;

__device__ __forceinline__ float load_logit(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_logit(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load_logit(const __nv_bfloat16* p) {
  return __bfloat162float(__ldg(p));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const scalar_t* __restrict__ logits, int64_t rows, int64_t vocab,
                  int64_t row_stride, double temperature, const int64_t* __restrict__ seeds,
                  const int64_t* __restrict__ positions, int64_t* __restrict__ out) {
  __shared__ float table[kBuckets];
  __shared__ double s_score[32];
  __shared__ int64_t s_idx[32];

  const bool race = temperature > 0.0;
  if (race) {
    for (int k = threadIdx.x; k < kBuckets; k += blockDim.x) {
      table[k] = __double2float_ru(gumbel_bucket_bound(k));  // rounded up: still a bound
    }
    __syncthreads();
  }
  const double inv_t = race ? 1.0 / temperature : 0.0;
  const bool prune = isfinite(inv_t);

  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const scalar_t* row = logits + r * row_stride;

    // 1. argmax of the raw logits (torch.argmax's rule).
    double best = -INFINITY;
    int64_t bi = INT64_MAX;
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      const double x = static_cast<double>(load_logit(row + v));
      if (better(x, v, best, bi)) {
        best = x;
        bi = v;
      }
    }
    block_argmax(best, bi, s_score, s_idx);
    if (!race || best != best || best == -INFINITY) {
      // T == 0; or a NaN logit (NaN score wins); or every weight is 0 (all scores -inf: id 0).
      if (threadIdx.x == 0) out[r] = (race && best == -INFINITY) ? 0 : bi;
      continue;
    }

    // 2.-3. race, seeded with the exact score of the largest logit.
    const uint64_t key = row_key(seeds[r], positions[r], kStreamDraft);
    best = gumbel_score(best, temperature, index_hash(key, static_cast<uint64_t>(bi)));
    double thr = prune_threshold(best);
    for (int64_t v = threadIdx.x; v < vocab; v += blockDim.x) {
      const uint64_t h = index_hash(key, static_cast<uint64_t>(v));
      const double x = static_cast<double>(load_logit(row + v));
      const double bound = x * inv_t + static_cast<double>(table[hash_bucket(h)]);
      if (bound >= thr || !prune) {
        const double s = gumbel_score(x, temperature, h);
        if (better(s, v, best, bi)) {
          best = s;
          bi = v;
          thr = prune_threshold(s);
        }
      }
    }
    // 4. combine.
    block_argmax(best, bi, s_score, s_idx);
    if (threadIdx.x == 0) out[r] = bi;
  }
}

template <typename scalar_t>
cudaError_t launch(const void* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                   double temperature, const int64_t* seeds, const int64_t* positions,
                   int64_t* out, cudaStream_t stream) {
  const int64_t max_blocks = 65535LL * 16;  // the kernel loops over rows past the grid
  const unsigned grid = static_cast<unsigned>(rows < max_blocks ? rows : max_blocks);
  sample_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
      static_cast<const scalar_t*>(logits), rows, vocab, row_stride, temperature, seeds,
      positions, out);
  return cudaGetLastError();
}

}  // namespace
}  // namespace speccascade

extern "C" cudaError_t sc_sample_launch(const void* logits, int dtype, int64_t rows,
                                        int64_t vocab, int64_t row_stride, double temperature,
                                        const int64_t* seeds, const int64_t* positions,
                                        int64_t* out, cudaStream_t stream) {
  using namespace speccascade;
  if (rows <= 0) return cudaSuccess;
  if (vocab <= 0 || !(temperature >= 0.0)) return cudaErrorInvalidValue;
  switch (dtype) {
    case SC_FLOAT32:
      return launch<float>(logits, rows, vocab, row_stride, temperature, seeds, positions, out,
                           stream);
    case SC_FLOAT16:
      return launch<__half>(logits, rows, vocab, row_stride, temperature, seeds, positions, out,
                            stream);
    case SC_BFLOAT16:
      return launch<__nv_bfloat16>(logits, rows, vocab, row_stride, temperature, seeds,
                                   positions, out, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
