// Counter-based RNG of docs/semantics.md §6, shared by the CPU and CUDA kernels.
//
// Normative reference: speccascade_fast/rng.py. Every function here must produce the same bits:
//   k = mix64(seed + GOLDEN); k = mix64(k ^ position); k = mix64(k ^ stream)
//   h = mix64(k + (index + 1) * GOLDEN)
//   u = ((h >> 12) + 0.5) * 2**-52            (fp64, exact: 52 bits + the half fit in 53)
// All integer arithmetic is on uint64_t, so wrapping is well defined (the int64 wrap in torch has
// the same bits). This header has no torch or CUDA dependency.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SC_HD __host__ __device__ __forceinline__
#else
#define SC_HD inline
#endif

namespace speccascade {

constexpr int kStreamDraft = 1;
constexpr int kStreamAccept = 2;
constexpr int kStreamResidual = 3;

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMul1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMul2 = 0x94D049BB133111EBULL;

SC_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * kMul1;
  z = (z ^ (z >> 27)) * kMul2;
  return z ^ (z >> 31);
}

// Per-(seed, position, stream) key; seed and position are reinterpreted int64 -> uint64 bits.
SC_HD uint64_t row_key(int64_t seed, int64_t position, uint64_t stream) {
  uint64_t k = mix64(static_cast<uint64_t>(seed) + kGolden);
  k = mix64(k ^ static_cast<uint64_t>(position));
  return mix64(k ^ stream);
}

// The 64 hash bits for vocabulary id `index` under `key`.
SC_HD uint64_t index_hash(uint64_t key, uint64_t index) {
  return mix64(key + (index + 1) * kGolden);
}

// The fp64 uniform of the hash bits: exact, so it lies in [2**-53, 1 - 2**-53], never 0 or 1.
SC_HD double uniform_from_hash(uint64_t h) {
  return (static_cast<double>(h >> 12) + 0.5) * 0x1p-52;
}

SC_HD double uniform(uint64_t key, uint64_t index) {
  return uniform_from_hash(index_hash(key, index));
}

}  // namespace speccascade
