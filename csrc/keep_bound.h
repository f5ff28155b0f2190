// The top-k / top-p keep bound of one logit row (speccascade_fast/truncation.py), one definition
// for the CPU verification and sampling kernels: the scaled law keeps
// K = {v : l_v > tau or (l_v == tau and v <= cut)} and gives every other token weight 0.
#pragma once

#include <cstdint>
#include <limits>

namespace speccascade {

struct KeepBound {
  bool trunc = false;  // false: every token is kept (no truncation, or a bound that keeps all)
  float tau = -std::numeric_limits<float>::infinity();
  int64_t cut = 0;

  // From the (tau, cut) pair of an op's float64 *_keep tensor (nullptr: keep all) for a row of
  // V logits; (-inf, >= V - 1) keeps everything and is no truncation.
  static KeepBound from(const double* k, int64_t V) {
    KeepBound b;
    if (k == nullptr) return b;
    b.trunc = !(k[0] == -std::numeric_limits<double>::infinity() &&
                k[1] >= static_cast<double>(V - 1));
    b.tau = static_cast<float>(k[0]);
    b.cut = static_cast<int64_t>(k[1] < static_cast<double>(V) ? k[1] : static_cast<double>(V));
    return b;
  }

  bool kept(float x, int64_t v) const { return !trunc || x > tau || (x == tau && v <= cut); }
};

}  // namespace speccascade
