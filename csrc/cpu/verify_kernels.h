// Vectorised block kernels of the fused CPU verification (csrc/cpu/verify_cpu.cpp: the targets
// and resample stages).
//
// Every function here works on one block of at most kBlock logits already converted to fp32
// (a row of fp32 logits is read in place; bf16/fp16 rows are converted block by block into a
// stack buffer, never as a whole tensor). They are plain loops written for the auto-vectoriser:
//
// * exp is our own branch-free polynomial (`exp_f32`, Cephes' expf, ~1 ulp), so that
//   `#pragma omp simd` loops vectorise without -ffast-math (which would break -inf handling);
// * sums are kept in 16 fp64 lanes (`lane_sum`): vectorised, and the same summation order on every
//   ISA and for every thread count;
// * on x86-64 with GCC each entry point is compiled three times (target_clones: AVX-512 "x86-64-v4",
//   AVX2+FMA "x86-64-v3", baseline SSE2) and the loader picks the best one for the CPU at run
//   time, so the wheel still runs on any x86-64 machine (setup.py deliberately has no -march).
//
// The translation unit that includes this header (verify_cpu.cpp) compiles it under
// `#pragma GCC optimize("no-trapping-math")`: without it GCC refuses to if-convert the selects of
// these loops (a float compare "may trap"). It does not change the handling of -inf, which the
// code does explicitly.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "../rng.h"
#include "../sample_common.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define SC_VERIFY_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SC_VERIFY_CLONES
#endif
#define SC_VERIFY_INLINE inline __attribute__((always_inline))

namespace speccascade {
namespace verify_kernels {

constexpr int kBlock = 1024;  // logits per block (4 KiB of fp32: a few buffers stay in L1)
constexpr int kLanes = 16;    // independent fp64 accumulators of lane_sum
constexpr float kNegInfF = -std::numeric_limits<float>::infinity();

template <class To, class From>
SC_VERIFY_INLINE To bit_cast(From x) {
#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
  return __builtin_bit_cast(To, x);
#endif
#endif
  To y;
  std::memcpy(&y, &x, sizeof y);
  return y;
}

// exp(x) in fp32 for x <= 88: Cody-Waite reduction by ln 2, degree-6 polynomial (Cephes expf),
// 2^n by exponent bits. Returns exactly 0 for x < -87.33 (where fp32 exp underflows), including
// x = -inf; never NaN for non-NaN x.
SC_VERIFY_INLINE float exp_f32(float x) {
  constexpr float kLo = -87.33654f;
  constexpr float kHi = 88.0f;
  const float xc = x > kLo ? (x < kHi ? x : kHi) : kLo;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = xc * 1.44269504088896341f + kMagic;
  const float n = t - kMagic;
  const int32_t ni = bit_cast<int32_t>(t) - bit_cast<int32_t>(kMagic);
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = bit_cast<float>((ni + 127) << 23);
  return x < kLo ? 0.0f : y * scale;
}

// expm1(x) in fp32: a degree-8 Taylor polynomial for |x| < 0.35 (accurate relative to the
// result, where exp(x) - 1 would cancel), exp(x) - 1 elsewhere; -1 at x = -inf. x is clamped at 80.
SC_VERIFY_INLINE float expm1_f32(float x) {
  const float xc = x < 80.0f ? x : 80.0f;  // (NaN -> 80: callers multiply it by a zero weight)
  float p = 1.0f / 40320.0f;
  p = p * xc + 1.0f / 5040.0f;
  p = p * xc + 1.0f / 720.0f;
  p = p * xc + 1.0f / 120.0f;
  p = p * xc + 1.0f / 24.0f;
  p = p * xc + 1.0f / 6.0f;
  p = p * xc + 0.5f;
  p = p * xc + 1.0f;
  const float small = p * xc;
  const float big = exp_f32(xc) - 1.0f;
  const float ax = xc < 0.0f ? -xc : xc;
  return ax < 0.35f ? small : big;
}

// sum of e[0..n) in 16 fp64 lanes, then the lanes in order, then the tail. (The lanes are indexed
// off a pointer: with -fwrapv, which torch's extension build passes, an index `i + k` of ints
// is not affine to GCC and the loop would not vectorise.)
SC_VERIFY_INLINE double lane_sum(const float* e, int n) {
  double acc[kLanes] = {};
  const int full = n - n % kLanes;
  for (int i = 0; i < full; i += kLanes) {
    const float* ei = e + i;
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(ei[k]);
  }
  double s = 0.0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  for (int i = full; i < n; ++i) s += static_cast<double>(e[i]);
  return s;
}

SC_VERIFY_INLINE float lane_max(const float* x, int n) {
  float acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = kNegInfF;
  const int full = n - n % kLanes;
  for (int i = 0; i < full; i += kLanes) {
    const float* xi = x + i;
#pragma omp simd
    for (int k = 0; k < kLanes; ++k) acc[k] = xi[k] > acc[k] ? xi[k] : acc[k];
  }
  float m = kNegInfF;
  for (int k = 0; k < kLanes; ++k) m = acc[k] > m ? acc[k] : m;
  for (int i = full; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// ---- dtype conversion --------------------------------------------------------------------------
// The 16-bit rows are copied into a local array of the matching type first (memcpy: no aliasing
// question), then widened in a loop the vectoriser turns into vpslld / vcvtph2ps.
SC_VERIFY_CLONES inline void convert_bf16(const void* src, float* dst, int n) {
  alignas(64) uint16_t tmp[kBlock];
  std::memcpy(tmp, src, sizeof(uint16_t) * static_cast<size_t>(n));
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    dst[i] = bit_cast<float>(static_cast<uint32_t>(tmp[i]) << 16);
  }
}

// IEEE half -> float by integer arithmetic (GCC 12 does not vectorise _Float16 conversions without
// AVX512-FP16): normals and inf/NaN by shifting the exponent/mantissa bits and rebiasing,
// subnormals as (mantissa * 2^-24), exact in fp32.
SC_VERIFY_CLONES inline void convert_f16(const void* src, float* dst, int n) {
  alignas(64) uint16_t tmp[kBlock];
  std::memcpy(tmp, src, sizeof(uint16_t) * static_cast<size_t>(n));
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const uint32_t h = tmp[i];
    const uint32_t em = h & 0x7fffu;
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t bias = em >= 0x7c00u ? 0x70000000u : 0x38000000u;  // inf/NaN keep 0xff
    const float fn = bit_cast<float>(((em << 13) + bias) | sign);
    float fs = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f;
    fs = sign ? -fs : fs;
    dst[i] = em < 0x400u ? fs : fn;
  }
}

// rng.h's index_hash, restated here so that it is compiled (and inlined, and vectorised) with the
// options of these loops: mix64(key + (index + 1) * golden), bit for bit the same.
SC_VERIFY_INLINE uint64_t hash_at(uint64_t key, uint64_t index) {
  uint64_t z = key + (index + 1) * kGolden;
  z = (z ^ (z >> 30)) * kMul1;
  z = (z ^ (z >> 27)) * kMul2;
  return z ^ (z >> 31);
}

SC_VERIFY_CLONES inline float block_max(const float* x, int n) { return lane_max(x, n); }

// ---- top-k / top-p truncation (speccascade_fast/truncation.py) ---------------------------------
// out[i] = x[i] where token lo + i is kept, K = {v : x_v > tau or (x_v == tau and v <= cut)},
// else -inf: the block the scaled softmax sums read. x == out is allowed.
SC_VERIFY_CLONES inline void truncate_block(const float* x, float* out, int n, int64_t lo, float tau,
                                            int64_t cut) {
  const int64_t c64 = cut - lo;  // ties are kept at block indices i <= c
  const int c = c64 < -1 ? -1 : (c64 > n ? n : static_cast<int>(c64));
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const bool keep = x[i] > tau || (x[i] == tau && i <= c);
    out[i] = keep ? x[i] : kNegInfF;
  }
}

// ---- pass 1: per-row online-softmax statistics of one block -------------------------------------
// With the row's running max m (already raised to this block's max):
//   acc[0] += sum exp(x - m)                         (flag kS1: the unscaled softmax, T = 1)
//   acc[1] += sum exp((x - m) * inv_t)               (flag kST: the scaled softmax)
//   acc[2] += sum exp(x - m) * (x - m)               (flag kH: for sum q log q; 0 where x = -inf)
// e1 receives exp(x - m) when kS1 is set (pass 1 of the bild rule reuses it).
enum : int { kS1 = 1, kST = 2, kH = 4 };

SC_VERIFY_CLONES inline void row_stats_block(const float* x, int n, float m, float inv_t, int flags,
                                             float* e1, float* w, double* acc) {
  if (flags & kS1) {
    if (flags & kH) {
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        float d = x[i] - m;
        d = d > -100.0f ? d : -100.0f;  // -inf -> -100: exp gives 0, and 0 * d stays 0
        const float e = exp_f32(d);
        e1[i] = e;
        w[i] = e * d;
      }
      acc[2] += lane_sum(w, n);
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) e1[i] = exp_f32(x[i] - m);
    }
    acc[0] += lane_sum(e1, n);
  }
  if (flags & kST) {
#pragma omp simd
    for (int i = 0; i < n; ++i) w[i] = exp_f32((x[i] - m) * inv_t);
    acc[1] += lane_sum(w, n);
  }
}

// bild, T > 0, with the rows' running maxima mq (inside e1q = exp(xq - mq)) and mp:
//   acc[0] += sum e1q * (xp - mp) and acc[1] += sum e1q over the tokens where xp > -inf, so that
//   sum q1 log p1 = acc[0] / S1q - log S1p without cancellation (the argmax terms are exactly 0);
// masked_max: the largest xq among the tokens the target masks (xp = -inf): if q gives one of
// them positive mass, -sum q1 log p1 is +inf.
SC_VERIFY_CLONES inline void cross_block(const float* e1q, const float* xq, const float* xp, int n,
                                         float mp, float* w, double* acc, float* masked_max) {
#pragma omp simd
  for (int i = 0; i < n; ++i) w[i] = xp[i] > kNegInfF ? e1q[i] * (xp[i] - mp) : 0.0f;
  acc[0] += lane_sum(w, n);
#pragma omp simd
  for (int i = 0; i < n; ++i) w[i] = xp[i] > kNegInfF ? e1q[i] : 0.0f;
  acc[1] += lane_sum(w, n);
#pragma omp simd
  for (int i = 0; i < n; ++i) w[i] = xp[i] > kNegInfF ? kNegInfF : xq[i];
  const float mm = lane_max(w, n);
  *masked_max = mm > *masked_max ? mm : *masked_max;
}

// ---- pass 2: sums that need both rows' normalisers ---------------------------------------------
// qT = exp((xq - mq) * inv_t) * rq, pT = exp((xp - mp) * inv_t) * rp (rq, rp: 1 / sum).

// TV(pT, qT) = sum max(0, pT - qT)   (opt / opt_log). Each difference is formed as
// pT * -expm1(log qT - log pT) with log qT - log pT = ((xq - xp) - dm) * inv_t - dl
// (dm = mq - mp, dl = log STq - log STp): accurate relative to the difference itself, so a TV of
// 1e-12 between nearly equal rows is not lost in fp32 rounding (opt with |alpha| = 1e6 multiplies
// it), and exactly 0 for identical rows.
SC_VERIFY_CLONES inline double tv_block(const float* xq, const float* xp, int n, float mp,
                                        float inv_t, float rp, float dm, float dl, float* w) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float pt = exp_f32((xp[i] - mp) * inv_t) * rp;
    const float delta = ((xq[i] - xp[i]) - dm) * inv_t - dl;
    const float d = -(pt * expm1_f32(delta));
    w[i] = d > 0.0f ? d : 0.0f;
  }
  return lane_sum(w, n);
}

// eta = sum over tokens outside A of qT. A = {v : (double)xa_v - ma >= thr} (fp64 compare, the
// same expression as the scalar membership test of verify_cpu.cpp).
SC_VERIFY_CLONES inline double eta_block(const float* xa, double ma, double thr, const float* xq,
                                         int n, float mq, float inv_t, float rq, float* w) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const bool in_a = static_cast<double>(xa[i]) - ma >= thr;
    const float qt = exp_f32((xq[i] - mq) * inv_t) * rq;
    w[i] = in_a ? 0.0f : qt;
  }
  return lane_sum(w, n);
}

// eta_block together with what a token rule's divergence cost needs once eta is known (budget
// calls): returns eta's block sum; out[0] += the sum of pT outside A; qt, pt receive the block's
// qT and pT; flag[i] = 1 where the token is in A with pT > qT (the only tokens whose cost term
// max(0, (1 - eta) pT - qT 1_A) inside A can be positive), out[1] += their number.
SC_VERIFY_CLONES inline double eta_split_block(const float* xa, double ma, double thr,
                                               const float* xq, const float* xp, int n, float mq,
                                               float mp, float inv_t, float rq, float rp,
                                               float* qt, float* pt, float* w, float* w2,
                                               float* flag, double* out) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const bool in_a = static_cast<double>(xa[i]) - ma >= thr;
    const float q = exp_f32((xq[i] - mq) * inv_t) * rq;
    const float p = exp_f32((xp[i] - mp) * inv_t) * rp;
    qt[i] = q;
    pt[i] = p;
    w[i] = in_a ? 0.0f : q;
    w2[i] = in_a ? 0.0f : p;
    flag[i] = in_a && p > q ? 1.0f : 0.0f;
  }
  out[0] += lane_sum(w2, n);
  out[1] += lane_sum(flag, n);
  return lane_sum(w, n);
}

// A token rule's divergence cost TV(pi, pT) = sum max(0, pT - pi), pi = qT on A + eta pT:
// sum max(0, keep_p * pT - (v in A ? qT : 0)) with keep_p = 1 - eta (A as in eta_block).
SC_VERIFY_CLONES inline double token_cost_block(const float* xa, double ma, double thr,
                                                const float* xq, const float* xp, int n, float mq,
                                                float mp, float inv_t, float rq, float rp,
                                                float keep_p, float* w) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const bool in_a = static_cast<double>(xa[i]) - ma >= thr;
    const float qt = exp_f32((xq[i] - mq) * inv_t) * rq;
    const float pt = exp_f32((xp[i] - mp) * inv_t) * rp;
    const float d = keep_p * pt - (in_a ? qt : 0.0f);
    w[i] = d > 0.0f ? d : 0.0f;
  }
  return lane_sum(w, n);
}

// lossy's bonus law: out[0] += sum max(0, qT - pT * c) (the rejected mass 1 - sum min(qT, pT c)),
// out[1] += sum max(0, pT - qT) (the residual's total), c = 1 / (1 - alpha).
SC_VERIFY_CLONES inline void lossy_block(const float* xq, const float* xp, int n, float mq, float mp,
                                         float inv_t, float rq, float rp, float c, float* w,
                                         float* w2, double* out) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float qt = exp_f32((xq[i] - mq) * inv_t) * rq;
    const float pt = exp_f32((xp[i] - mp) * inv_t) * rp;
    const float a = qt - pt * c;
    const float b = pt - qt;
    w[i] = a > 0.0f ? a : 0.0f;
    w2[i] = b > 0.0f ? b : 0.0f;
  }
  out[0] += lane_sum(w, n);
  out[1] += lane_sum(w2, n);
}

// scaled probabilities of one block: out = exp((x - m) * inv_t) * r
SC_VERIFY_CLONES inline void probs_block(const float* x, int n, float m, float inv_t, float r,
                                         float* out) {
#pragma omp simd
  for (int i = 0; i < n; ++i) out[i] = exp_f32((x[i] - m) * inv_t) * r;
}

// lossy_star: sum max(0, qT - c pT) (the mass pi must take from pT / beta)
SC_VERIFY_CLONES inline double deficit_block(const float* qt, const float* pt, int n, float c,
                                             float* w) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float a = qt[i] - c * pt[i];
    w[i] = a > 0.0f ? a : 0.0f;
  }
  return lane_sum(w, n);
}

// ---- resample: the pruning bound of the Gumbel-max race ----------------------------------------
// For token v = lo + i, val[i] = LB_v + G[bucket(h_v)] where
//   LB_v = max(a0 + (xq_v - mq) * inv_t, b0 + (xp_v - mp) * inv_t)  >=  log w_v   (an upper bound
//          of the log-weight, linear in the logits: no exp, no log), and
//   G[k] >= -log(-log u) for every u of hash bucket k (the top bits of the token's RESIDUAL hash),
// or -inf where LB_v = -inf (weight 0). Returns max_i val[i]: a block whose maximum is below the
// running threshold holds no possible winner and is skipped without a single log.
SC_VERIFY_CLONES inline float race_bound_block(const float* xq, const float* xp, int n, int64_t lo,
                                               uint64_t key, float mq, float mp, float inv_t,
                                               float a0, float b0, const float* table, float* val) {
  // xq == nullptr: the q term is absent (a0 = -inf); xp == nullptr: the p term is absent.
  alignas(64) uint32_t bucket[kBlock];
  const uint64_t base = static_cast<uint64_t>(lo);
#pragma omp simd
  for (int i = 0; i < n; ++i)
    bucket[i] = static_cast<uint32_t>(hash_at(key, base + static_cast<uint32_t>(i)) >>
                                      (64 - kBucketBits));
  for (int i = 0; i < n; ++i) val[i] = table[bucket[i]];  // (GCC's generic tuning: no gathers)
  if (xq != nullptr && xp != nullptr) {
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const float lq = a0 + (xq[i] - mq) * inv_t;
      const float lp = b0 + (xp[i] - mp) * inv_t;
      const float lb = lq > lp ? lq : lp;
      val[i] = lb > kNegInfF ? lb + val[i] : kNegInfF;
    }
  } else {
    const float* x = xq != nullptr ? xq : xp;
    const float m = xq != nullptr ? mq : mp;
    const float c = xq != nullptr ? a0 : b0;
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const float lb = c + (x[i] - m) * inv_t;
      val[i] = lb > kNegInfF ? lb + val[i] : kNegInfF;
    }
  }
  return lane_max(val, n);
}

}  // namespace verify_kernels
}  // namespace speccascade
