// Pieces of the drafter sampler shared by the CPU and CUDA kernels (no torch, no CUDA headers).
//
// The sampler returns, per row, argmax_v s_v with
//     T == 0:  s_v = l_v
//     T  > 0:  s_v = l_v / T - log(-log u_v),   u_v = uniform(row_key(seed, pos, DRAFT), v)
// in fp64, ties to the lowest id, and a NaN score beating everything (torch.argmax's rule, so the
// kernels agree with the torch reference even on NaN logits).
//
// Pruning. Evaluating two fp64 logs per vocabulary entry dominates a naive kernel. The Gumbel term
// g(u) = -log(-log u) is increasing in u, so the top kBucketBits of the hash (which fix an
// interval of u) give an upper bound G[bucket] >= g(u). An entry whose l_v / T + G[bucket] is
// below the best exact score seen so far (minus a rounding margin) cannot win and is skipped
// without any log. Only the last bucket (u close to 1, G = +inf) always needs the exact score.
// The exact scores are computed by the same formula as the reference, so pruning changes no bit.
#pragma once

#include <cmath>
#include <cstdint>

#include "rng.h"

namespace speccascade {

constexpr int kBucketBits = 12;
constexpr int kBuckets = 1 << kBucketBits;

SC_HD int hash_bucket(uint64_t h) { return static_cast<int>(h >> (64 - kBucketBits)); }

// Upper bound of g(u) over bucket k, in fp64 (the callers round it up to fp32 for the table).
// u = ((h >> 12) + 0.5) * 2**-52 <= (k + 1) / kBuckets for every h in bucket k (rounding is
// monotone and the edge is representable), so g((k + 1) / kBuckets) bounds the bucket.
SC_HD double gumbel_bucket_bound(int k) {
  if (k >= kBuckets - 1) return INFINITY;
  const double edge = static_cast<double>(k + 1) / kBuckets;
  return -log(-log(edge));
}

// The exact fp64 score of one entry, the reference's formula term by term:
// logits.double() / T, then log_w - log(exp_noise) with exp_noise = -log(u).
SC_HD double gumbel_score(double logit, double temperature, uint64_t h) {
  const double u = uniform_from_hash(h);
  return logit / temperature - log(-log(u));
}

// Is (score a, id ia) a better argmax candidate than (b, ib)?
// NaN first, then larger, then lower id.
SC_HD bool better(double a, int64_t ia, double b, int64_t ib) {
  const bool na = a != a, nb = b != b;  // isnan without <cmath> overloads that differ on device
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Entries whose bound is below this cannot beat `best`. The margin covers the rounding of the
// bound (l * (1/T) instead of l / T, fp32 table) and of the exact scores (a few ulps of numbers
// of magnitude |best| + 64; |g| < 40 for every representable u < 1).
SC_HD double prune_threshold(double best) {
  if (best == INFINITY || best == -INFINITY) return best;
  return best - 1e-9 * (fabs(best) + 64.0);
}

}  // namespace speccascade
