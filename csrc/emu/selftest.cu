// Kernels with and without the bugs the CUDA emulator promises to expose (csrc/emu/README.md),
// run by tests/test_cuda_emu.py: a block reduction with and without its barrier, warp shuffle
// reductions, barriers in divergent code, a shuffle that waits for lanes stuck at a barrier, a
// shuffle in a partial warp, and a launch with too many threads. Emulator-only (not shipped).
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int kThreads = 128;

// out[block] = 1 + 2 + ... + kThreads, through shared memory; `sync` = false drops the barrier
// between the writes and the read.
__global__ void block_sum(int64_t* out, bool sync) {
  __shared__ int64_t s[kThreads];
  s[threadIdx.x] = threadIdx.x + 1;
  if (sync) __syncthreads();
  if (threadIdx.x == 0) {
    int64_t t = 0;
    for (int i = 0; i < kThreads; ++i) t += s[i];
    out[blockIdx.x] = t;
  }
}

// out[2 w] / out[2 w + 1] = the sum of the lane ids + 1 of warp w, by xor butterfly / shift down.
__global__ void warp_sums(int64_t* out) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double x = lane + 1, d = lane + 1;
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  for (int o = 16; o > 0; o >>= 1) d += __shfl_down_sync(0xffffffffu, d, o);
  if (lane == 0) {
    out[2 * warp] = static_cast<int64_t>(x);
    out[2 * warp + 1] = static_cast<int64_t>(d);
  }
}

__global__ void divergent_barriers(int64_t* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
    out[1] = 1;
  } else {
    out[2] = 1;
    __syncthreads();
  }
}

__global__ void shuffle_against_barrier(int64_t* out) {
  int64_t v = threadIdx.x;
  if (threadIdx.x == 0) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[0] = v;
}

__global__ void partial_warp_shuffle(int64_t* out) {
  if ((threadIdx.x & 31) >= 16) return;
  const int64_t v = __shfl_xor_sync(0xffffffffu, static_cast<int64_t>(threadIdx.x), 1);
  if (threadIdx.x == 0) out[0] = v;
}

}  // namespace

// Runs the case `name` on `out` (at least 64 entries, zeroed first); returns the launch status.
extern "C" cudaError_t sc_emu_selftest(const char* name, int64_t* out) {
  std::memset(out, 0, 64 * sizeof(int64_t));
  if (std::strcmp(name, "block_sum") == 0 || std::strcmp(name, "block_sum_no_barrier") == 0) {
    block_sum<<<4, kThreads>>>(out, std::strcmp(name, "block_sum") == 0);
  } else if (std::strcmp(name, "warp_sums") == 0) {
    warp_sums<<<1, kThreads>>>(out);
  } else if (std::strcmp(name, "divergent_barriers") == 0) {
    divergent_barriers<<<1, kThreads>>>(out);
  } else if (std::strcmp(name, "shuffle_against_barrier") == 0) {
    shuffle_against_barrier<<<1, kThreads>>>(out);
  } else if (std::strcmp(name, "partial_warp_shuffle") == 0) {
    partial_warp_shuffle<<<1, kThreads>>>(out);
  } else if (std::strcmp(name, "too_many_threads") == 0) {
    block_sum<<<1, 2048>>>(out, true);
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
