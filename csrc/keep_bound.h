// The top-k / top-p keep bound of one logit row (speccascade_fast/truncation.py), one definition
// for the CPU verification and sampling kernels and the CUDA verification kernel: the scaled law
// keeps K = {v : l_v > tau or (l_v == tau and v <= cut)} and gives every other token weight 0.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define SC_HOST_DEVICE __host__ __device__
#else
#define SC_HOST_DEVICE
#endif

namespace speccascade {

struct KeepBound {
  bool trunc = false;  // false: every token is kept (no truncation, or a bound that keeps all)
  float tau = -HUGE_VALF;
  int64_t cut = 0;

  // From the (tau, cut) pair of an op's float64 *_keep tensor (nullptr: keep all) for a row of
  // V logits; (-inf, >= V - 1) keeps everything and is no truncation.
  SC_HOST_DEVICE static KeepBound from(const double* k, int64_t V) {
    KeepBound b;
    if (k == nullptr) return b;
    b.trunc = !(k[0] == -HUGE_VAL && k[1] >= static_cast<double>(V - 1));
    b.tau = static_cast<float>(k[0]);
    b.cut = static_cast<int64_t>(k[1] < static_cast<double>(V) ? k[1] : static_cast<double>(V));
    return b;
  }

  SC_HOST_DEVICE bool kept(float x, int64_t v) const {
    return !trunc || x > tau || (x == tau && v <= cut);
  }

  // x where kept, else -inf: what the scaled laws qT / pT are formed from (the unscaled q1 / p1
  // read x itself).
  SC_HOST_DEVICE float apply(float x, int64_t v) const { return kept(x, v) ? x : -HUGE_VALF; }
};

}  // namespace speccascade
