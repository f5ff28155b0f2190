// Fused speculative-cascade verification on CUDA: the "cuda" backend (verify_padded and
// verify_ragged: one set of kernels for both layouts, see rows_of).
//
// Semantics: exactly csrc/cpu/verify_cpu.cpp (hence speccascade_fast/backends/reference.py):
// Algorithm 4 towards each rule's target, the counter-based RNG of rng.h keyed identically
// (ACCEPT uniforms at (seed, position + j, index 0), the race's uniforms at
// (seed, position + j*, RESIDUAL, token id)), the same fp64 scalar formulas for qT(x), pT(x), the
// acceptance ratio and the race weights, and the same exact fp64 race score
// log w - log(-log u). Softmax sums are fp32 exp terms accumulated in fp64, as on the CPU.
// Plain CUDA C++: no torch headers (bound from verify_cuda.cpp through verify.h).
//
// Stages (the names every backend shares: speccascade_fast/backends/reference.py) and the
// kernels that run them. No host synchronisation, fixed grids: CUDA-graph capturable. The
// vocabulary is cut into S slices of SLICE logits (SLICE = a power of two in [1024, 8192], about
// V / 32; V / 128 for B = 1 and V / 64 for B = 2, so that small batches still fill the GPU:
// slice_size); NPOS = B (gamma + 1) positions. In the ragged layout (vLLM's flattened rows,
// per-request gamma_b) the grid is the same with gamma = max gamma_b, and the positions
// j > gamma_b of request b do nothing (the targets kernels return at once, accept_resample_kernel
// never reads them); rows_of / x_at / gamma_of are the only code that tells the layouts apart.
//
//   targets   per position, both models' distributions, the deferral decision, the target law:
//     targets_stats_kernel        grid (NPOS, S), 256 threads. Per (position, slice), for the
//                                 draft row q and the target row p: the slice max and its lowest
//                                 argmax (first sweep), then (second sweep, L1/L2-resident)
//                                 sum exp(l - m), sum exp((l - m)/T), sum exp(l - m)(l - m) and,
//                                 for bild at T > 0, the cross terms sum_{p > -inf} e_q (p - m_p),
//                                 sum_{p > -inf} e_q, max_{p = -inf} q. Also zeroes the
//                                 per-request arrival counters of accept_resample_kernel.
//     (only where a rule needs sums that need the whole row's normalisers first; T > 0 rows)
//     targets_second_pass_kernel  grid (NPOS, S): opt / opt_log TV(pT, qT); token_v1-3
//                                 eta = qT(outside A); lossy with bonus="cascade": its bonus
//                                 law's two sums (bonus row only);
//     or targets_lossy_star_kernel  grid (NPOS), 512 threads, one block per row: 1/beta by
//                                 k-section (17 passes over the row, 8 candidates each:
//                                 9^17 > 2^53) on the piecewise-linear equation the CPU kernel
//                                 solves by quickselect. Correct, not fast (one block reads the
//                                 row 18 times).
//   end of targets + accept + resample + insert, fused:
//     accept_resample_kernel      grid (B, S), 256 threads. targets: every block of request b
//                                 merges the slice statistics of the request's gamma + 1
//                                 positions (one warp per position, fp64) and takes the rule's
//                                 decisions. accept: thread 0 replays the accept loop
//                                 (u_j < accept_j(x_j) / max(qT_j(x_j), 1e-10), fp64): all blocks
//                                 of b find the same j* because they run the same code on the
//                                 same inputs. resample: each block races its slice of the
//                                 resample row (residual at j*, with the position's law
//                                 min(qT, accept) raced alongside for when the residual is all
//                                 zero; or the bonus row), block argmax, writes its two
//                                 candidates; the last block of b to arrive (threadfence + atomic
//                                 ticket) merges the S candidates in slice order. insert: that
//                                 block writes tokens, num_accepted and deferred for b.
//
// So spec, drafter, chow, chow_log, diff, diff_log, bild and lossy (bonus="verifier") take 2
// launches; opt, opt_log, token_v1-3, lossy (bonus="cascade") and lossy_star take 3.
//
// Divergence budget (a.budget, padded layout; docs/semantics.md §9): each position's cost
// TV(pi, pT) comes from the targets stage's sums: targets_second_pass_kernel also runs for
// drafter and the prefix rules (TV(pT, qT); opt / opt_log have it already) and for lossy at every
// row (its cost is max(0, tot - rm) from its bonus law's two sums); targets_lossy_star_kernel
// reads each row once more after 1/beta; token rules, whose pi needs eta first, take a second
// launch of targets_second_pass_kernel (cost_pass: the one extra reduction over the row).
// T = 0 rows have closed forms. accept_resample_kernel's thread 0 scans the costs in order
// before the accept loop; a position that would overspend is verified as spec (pi = pT).
//
// top-k / top-p: each row's keep bound (tau, cut) (csrc/keep_bound.h, computed by the caller)
// turns its logits to -inf outside the kept set wherever qT / pT are formed (the sums at T of
// targets_stats_kernel, every sum of the second-pass kernels, qT(x) / pT(x) and the race of
// accept_resample_kernel); the maxima, argmaxes, unscaled sums and token sets read the logits
// themselves, as in verify_cpu.cpp.
//
// Differences from the CPU kernel that do not change results: every position's statistics are
// computed (the CPU computes some lazily, as its accept loop reaches them); TV, eta and 1/beta
// are computed wherever they may be needed (the CPU skips them where the decision does not depend
// on them; those shortcuts are exact); the race scores every token exactly (the CPU prunes with
// a bound first; pruning changes no result). Reductions have a fixed order: results do not
// depend on scheduling.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>

#include "../keep_bound.h"
#include "rng.cuh"
#include "verify.h"

namespace speccascade {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStarThreads = 512;
constexpr int kStarWarps = kStarThreads / 32;
constexpr int kStarK = 8;        // lossy_star: candidates per pass
constexpr int kStarPasses = 17;  // (kStarK + 1)^17 > 2^53: the interval shrinks to fp64 resolution
constexpr double kQFloor = 1e-10;  // rules.Q_FLOOR
constexpr unsigned kFull = 0xffffffffu;

// rules.RULES, in order (the same ids as verify_cpu.cpp)
enum Rule : int {
  kSpec, kDrafter, kChow, kChowLog, kDiff, kDiffLog, kOpt, kOptLog,
  kTokenV1, kTokenV2, kTokenV3, kLossy, kLossyStar, kBild, kNumRules
};
static_assert(kNumRules == SC_VERIFY_NUM_RULES, "verify.h's rule count is this enum's");
__host__ __device__ inline bool is_prefix(int r) { return (r >= kChow && r <= kOptLog) || r == kBild; }
__host__ __device__ inline bool is_token(int r) { return r >= kTokenV1 && r <= kTokenV3; }

enum PiMode : int { kPiQ, kPiP, kPiToken, kPiLossy, kPiLStar };
enum RaceKind : int { kRaceResidual, kRaceBonus, kRaceVerifier };

// ---- loads -----------------------------------------------------------------------------------
__device__ __forceinline__ float ld(const void* base, int dt, int64_t i) {
  if (dt == SC_FLOAT32) return __ldg(static_cast<const float*>(base) + i);
  const unsigned short h = __ldg(static_cast<const unsigned short*>(base) + i);
  if (dt == SC_BFLOAT16) return __uint_as_float(static_cast<unsigned>(h) << 16);
  return __half2float(__ushort_as_half(h));
}

// ---- the two layouts -------------------------------------------------------------------------
// Every kernel works on the padded grid of B (gamma + 1) positions; in the ragged layout
// (a.cu set, gamma = the largest gamma_b) the positions j > gamma_b of request b are inactive:
// no kernel reads their rows or their workspace entries. These three functions are the only
// places that know where a position's rows and draft token lie.

// Request b's number of drafts (ragged: at most a.gamma, which the host validated, or which
// the caller of max_spec_len guarantees; the clamp only keeps a broken promise inside the buffers).
__device__ __forceinline__ int64_t gamma_of(const sc_verify_args& a, int64_t b) {
  return a.cu == nullptr ? a.gamma : min(a.cu[b + 1] - a.cu[b], a.gamma);
}

// The draft token of request b at position j < gamma_of(a, b).
__device__ __forceinline__ int64_t x_at(const sc_verify_args& a, int64_t b, int64_t j) {
  return a.cu == nullptr ? a.x[b * a.x_sb + j * a.x_sj] : a.x[(a.cu[b] + j) * a.x_sj];
}

struct Rows {
  const void* q;         // the draft row's tensor (the bonus tensor at a ragged bonus position)
  int q_dt;              // its enum sc_dtype
  int64_t q_off, p_off;  // element offsets of the two rows of one position
  bool active;           // j <= gamma_of(a, b)
  bool has_q;            // a draft row exists (j < gamma_b, or j == gamma_b with bonus="cascade")
  KeepBound kq, kp;      // top-k / top-p: what qT / pT keep (every token without truncation)
};

__device__ __forceinline__ Rows rows_of(const sc_verify_args& a, int64_t b, int64_t j) {
  Rows r;
  r.q = a.q;
  r.q_dt = a.q_dtype;
  r.q_off = 0;
  const double* kq = nullptr;
  const double* kp = nullptr;
  if (a.cu == nullptr) {
    r.active = true;
    r.has_q = j < a.rq;
    if (r.has_q) {
      r.q_off = b * a.q_sb + j * a.q_sj;
      if (a.q_keep != nullptr) kq = a.q_keep + 2 * (b * a.rq + j);
    }
    r.p_off = b * a.p_sb + j * a.p_sj;
    if (a.p_keep != nullptr) kp = a.p_keep + 2 * (b * (a.gamma + 1) + j);
  } else {
    const int64_t c = a.cu[b], g = gamma_of(a, b);
    r.active = j <= g;
    r.has_q = j < g || (j == g && a.rq == a.gamma + 1);
    if (j < g) {
      r.q_off = (c + j) * a.q_sj;
      if (a.q_keep != nullptr) kq = a.q_keep + 2 * (c + j);
    } else if (r.has_q) {  // the bonus position, bonus="cascade"
      r.q = a.qb;
      r.q_dt = a.qb_dtype;
      r.q_off = b * a.qb_sb;
      if (a.qb_keep != nullptr) kq = a.qb_keep + 2 * b;
    }
    const int64_t row = c + b + (r.active ? j : 0);  // (an inactive position reads no row)
    r.p_off = row * a.p_sj;
    if (a.p_keep != nullptr && r.active) kp = a.p_keep + 2 * row;
  }
  r.kq = KeepBound::from(kq, a.V);
  r.kp = KeepBound::from(kp, a.V);
  return r;
}

// ---- per-slice statistics (targets_stats_kernel) -----------------------------------------------
struct SliceStats {
  double q1, qt, qh;   // sum exp(l - m), sum exp((l - m) / T), sum exp(l - m)(l - m), q row
  double p1, pt, ph;   // the same, p row
  double cross, cross_s;  // bild: sum_{p>-inf} exp(q - mq)(p - mp), sum_{p>-inf} exp(q - mq)
  float mq, mp;        // slice maxima (-inf: no finite logit in the slice)
  float masked;        // bild: max q over the tokens with p = -inf
  int aq, ap;          // lowest id of the slice max (INT_MAX where the max is -inf)
};

// A position's merged statistics (whole row).
struct PosInfo {
  double q1, qt, qh, p1, pt, ph, cross;
  float mq, mp, masked;
  int aq, ap;
};

// Everything the targets stage derives for one position (in accept_resample_kernel).
struct PosFull {
  PosInfo s;
  double q_lst, p_lst;  // log of the scaled sums (T > 0)
  double thr;           // token rules: v in A iff (double) l_v - m >= thr (q row for v1, else p)
  double eta;           // token rules: qT(outside A)
  double sstar;         // lossy_star: 1 / beta
  double rm, tot;       // lossy bonus law: rejected mass and residual total
  int delta;            // prefix rules: defer
  double cost, charge;  // divergence budget: TV(pi, pT), and what the scan charged
  int exact;            // divergence budget: verified as spec (pi = pT)
};

// ---- reductions ------------------------------------------------------------------------------
// (max, lowest id): a total order, so the xor butterfly leaves the same winner in every lane.
__device__ __forceinline__ void warp_max_arg(float& m, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(kFull, m, o);
    const int i2 = __shfl_xor_sync(kFull, i, o);
    if (m2 > m || (m2 == m && i2 < i)) {
      m = m2;
      i = i2;
    }
  }
}

__device__ __forceinline__ double warp_sum(double v) {
  // a + b == b + a bitwise: every lane ends with the same sum
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_fmax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

__device__ __forceinline__ int warp_imin(int v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Block-wide (max, lowest id); every thread gets the result. All threads must call it.
// `sm` / `si` hold at least WARPS entries.
template <int WARPS>
__device__ __forceinline__ void block_max_arg(float& m, int& i, float* sm, int* si) {
  warp_max_arg(m, i);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    sm[warp] = m;
    si[warp] = i;
  }
  __syncthreads();
  m = sm[0];
  i = si[0];
  for (int w = 1; w < WARPS; ++w) {
    if (sm[w] > m || (sm[w] == m && si[w] < i)) {
      m = sm[w];
      i = si[w];
    }
  }
  __syncthreads();  // the scratch may be reused right after
}

// Block-wide sums of K doubles, in a fixed order; every thread gets the results. All threads
// must call it. `scratch` holds at least WARPS * K doubles.
template <int WARPS, int K>
__device__ __forceinline__ void block_sums(double (&v)[K], double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = warp_sum(v[k]);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) scratch[warp * K + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) {
    double s = 0.0;
    for (int w = 0; w < WARPS; ++w) s += scratch[w * K + k];
    v[k] = s;
  }
  __syncthreads();
}

// ==== stage: targets (first launch: statistics) =================================================
__global__ void __launch_bounds__(kThreads)
    targets_stats_kernel(sc_verify_args a, int64_t slice, int S, SliceStats* __restrict__ ws,
                         unsigned* __restrict__ counters) {
  __shared__ float s_m[kWarps];
  __shared__ int s_i[kWarps];
  __shared__ double s_sum[kWarps * 8];

  const int64_t n = blockIdx.x;
  const int s = blockIdx.y;
  const int64_t G1 = a.gamma + 1;
  const int64_t b = n / G1, j = n % G1;
  // the arrival counter of accept_resample_kernel
  if (j == 0 && s == 0 && threadIdx.x == 0) counters[b] = 0u;
  const Rows R = rows_of(a, b, j);
  if (!R.active) return;  // ragged: past this request's bonus position (uniform over the block)
  const double t = a.temperature[b];
  const double inv_t = t > 0.0 ? 1.0 / t : 1.0;
  const float inv_t_f = static_cast<float>(fmin(inv_t, static_cast<double>(FLT_MAX)));
  const bool cross = a.rule == kBild && t > 0.0 && R.has_q;
  const int64_t lo = static_cast<int64_t>(s) * slice;
  const int64_t hi = lo + slice < a.V ? lo + slice : a.V;

  // first sweep: maxima and their lowest ids (ascending v per thread: strict > keeps the lowest)
  float mq = -INFINITY, mp = -INFINITY;
  int aq = INT_MAX, ap = INT_MAX;
  for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) {
    if (R.has_q) {
      const float x = ld(R.q, R.q_dt, R.q_off + v);
      if (x > mq) mq = x, aq = static_cast<int>(v);
    }
    const float y = ld(a.p, a.p_dtype, R.p_off + v);
    if (y > mp) mp = y, ap = static_cast<int>(v);
  }
  block_max_arg<kWarps>(mq, aq, s_m, s_i);
  block_max_arg<kWarps>(mp, ap, s_m, s_i);

  // second sweep: sums relative to the slice maxima (fp32 terms, fp64 accumulation)
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // q1 qt qh p1 pt ph cross cross_s
  float masked = -INFINITY;
  for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) {
    const float x = R.has_q ? ld(R.q, R.q_dt, R.q_off + v) : -INFINITY;
    const float y = ld(a.p, a.p_dtype, R.p_off + v);
    float eq = 0.0f;
    if (x > -INFINITY) {
      const float d = x - mq;
      eq = expf(d);
      acc[0] += static_cast<double>(eq);
      if (R.kq.kept(x, v)) acc[1] += static_cast<double>(expf(d * inv_t_f));
      acc[2] += static_cast<double>(eq * d);
    }
    if (y > -INFINITY) {
      const float d = y - mp;
      const float e = expf(d);
      acc[3] += static_cast<double>(e);
      if (R.kp.kept(y, v)) acc[4] += static_cast<double>(expf(d * inv_t_f));
      acc[5] += static_cast<double>(e * d);
    }
    if (cross) {
      if (y > -INFINITY) {
        acc[6] += static_cast<double>(eq * (y - mp));
        acc[7] += static_cast<double>(eq);
      } else {
        masked = fmaxf(masked, x);
      }
    }
  }
  block_sums<kWarps, 8>(acc, s_sum);
  masked = warp_fmax(masked);
  if ((threadIdx.x & 31) == 0) s_m[threadIdx.x >> 5] = masked;
  __syncthreads();
  if (threadIdx.x == 0) {
    float mm = s_m[0];
    for (int w = 1; w < kWarps; ++w) mm = fmaxf(mm, s_m[w]);
    SliceStats o;
    o.q1 = acc[0], o.qt = acc[1], o.qh = acc[2];
    o.p1 = acc[3], o.pt = acc[4], o.ph = acc[5];
    o.cross = acc[6], o.cross_s = acc[7];
    o.mq = mq, o.mp = mp, o.masked = mm;
    o.aq = aq, o.ap = ap;
    ws[n * S + s] = o;
  }
}

// ---- merging a position's slices (one warp; every lane gets the result) ------------------------
// One model's sums of one slice, rescaled from the slice max m_slice to the position max m and
// added to acc[0..2] (sum exp, sum exp at T, entropy term); the argmax keeps the lowest id among
// slices at the max. Returns exp(m_slice - m).
__device__ __forceinline__ double merge_slice(float m_slice, float m, int a_slice, double s1,
                                              double st, double sh, double inv_t, int& a,
                                              double* acc) {
  if (m_slice == m) a = min(a, a_slice);
  const double dm = static_cast<double>(m_slice) - static_cast<double>(m);
  const double c1 = exp(dm);
  acc[0] += c1 * s1;
  acc[1] += exp(dm * inv_t) * st;
  acc[2] += c1 * (sh + s1 * dm);
  return c1;
}

// Not inlined: the three kernels that call it run the same machine code, so they derive the same
// bits (e.g. targets_second_pass_kernel's eta and accept_resample_kernel's set A use one
// threshold).
__device__ __noinline__ PosInfo merge_pos(const SliceStats* __restrict__ ws, int64_t n, int S, double inv_t,
                             bool cross) {
  const int lane = threadIdx.x & 31;
  const SliceStats* row = ws + n * S;
  float mq = -INFINITY, mp = -INFINITY, masked = -INFINITY;
  for (int s = lane; s < S; s += 32) {
    mq = fmaxf(mq, row[s].mq);
    mp = fmaxf(mp, row[s].mp);
    masked = fmaxf(masked, row[s].masked);
  }
  mq = warp_fmax(mq);
  mp = warp_fmax(mp);
  masked = warp_fmax(masked);
  int aq = INT_MAX, ap = INT_MAX;
  double acc[7] = {0, 0, 0, 0, 0, 0, 0};  // q1 qt qh p1 pt ph cross
  const double Mp = mp;
  for (int s = lane; s < S; s += 32) {
    const SliceStats& x = row[s];
    if (x.mq > -INFINITY) {
      const double c1 = merge_slice(x.mq, mq, x.aq, x.q1, x.qt, x.qh, inv_t, aq, acc);
      if (cross && x.mp > -INFINITY)
        acc[6] += c1 * (x.cross + (static_cast<double>(x.mp) - Mp) * x.cross_s);
    }
    if (x.mp > -INFINITY) merge_slice(x.mp, mp, x.ap, x.p1, x.pt, x.ph, inv_t, ap, acc + 3);
  }
  PosInfo o;
  o.q1 = warp_sum(acc[0]);
  o.qt = warp_sum(acc[1]);
  o.qh = warp_sum(acc[2]);
  o.p1 = warp_sum(acc[3]);
  o.pt = warp_sum(acc[4]);
  o.ph = warp_sum(acc[5]);
  o.cross = warp_sum(acc[6]);
  aq = warp_imin(aq);
  ap = warp_imin(ap);
  o.mq = mq, o.mp = mp, o.masked = masked;
  o.aq = mq > -INFINITY ? aq : 0;  // (the CPU kernel's initial argmax of an empty row)
  o.ap = mp > -INFINITY ? ap : 0;
  return o;
}

// Token rules' threshold of A on (logit - max), from the unscaled sums (verify_cpu.cpp's
// targets_derive).
__device__ __forceinline__ double token_thr(int rule, double alpha, const PosInfo& X) {
  double cth;
  if (rule == kTokenV3) cth = 1.0 - alpha;
  else if (rule == kTokenV2) cth = 1.0 - alpha * X.p1;
  else cth = X.q1 * (1.0 / X.p1 - alpha);
  return cth <= 0.0 ? -INFINITY : log(cth);
}

__device__ __forceinline__ bool in_a_logit(float l, float m, double thr) {
  return static_cast<double>(l) - static_cast<double>(m) >= thr;
}

// Sum of the per-slice second-pass sums of position n, field f, in slice order.
__device__ __forceinline__ double sum_slices(const double* sums, int64_t n, int S, int f) {
  double acc = 0.0;
  for (int s = 0; s < S; ++s) acc += sums[(n * S + s) * 2 + f];
  return acc;
}

// ==== stage: targets (second launch, a: second-pass sums) =======================================
__global__ void __launch_bounds__(kThreads)
    targets_second_pass_kernel(sc_verify_args a, int64_t slice, int S,
                               const SliceStats* __restrict__ ws, double* __restrict__ sums,
                               int cost_pass) {
  __shared__ PosInfo s_info;
  __shared__ double s_sum[kWarps * 2];
  const int64_t n = blockIdx.x;
  const int s = blockIdx.y;
  const int64_t G1 = a.gamma + 1;
  const int64_t b = n / G1, j = n % G1;
  const double t = a.temperature[b];
  const bool lossy = a.rule == kLossy;
  const bool budget = a.budget != nullptr;  // (lossy: every row's cost needs its sums)
  const bool need = t > 0.0 && rows_of(a, b, j).has_q &&  // (has_q is false when inactive)
                    (!lossy || budget || (j == gamma_of(a, b) && a.rq == G1));
  if (!need) return;  // uniform over the block: before any barrier
  const double inv_t = 1.0 / t;
  const float inv_t_f = static_cast<float>(fmin(inv_t, static_cast<double>(FLT_MAX)));
  const double alpha = a.alpha[b];
  if (threadIdx.x < 32) {
    const PosInfo X = merge_pos(ws, n, S, inv_t, false);
    if (threadIdx.x == 0) s_info = X;
  }
  __syncthreads();
  const Rows R = rows_of(a, b, j);  // (after the call: nothing of it lives across merge_pos)
  const PosInfo X = s_info;
  const float mq = X.mq, mp = X.mp;
  const float rq = static_cast<float>(1.0 / X.qt), rp = static_cast<float>(1.0 / X.pt);
  const int64_t lo = static_cast<int64_t>(s) * slice;
  const int64_t hi = lo + slice < a.V ? lo + slice : a.V;
  double acc[2] = {0.0, 0.0};
  if (cost_pass) {
    // token rules, divergence budget: field 1 = sum max(0, pT - pi), pi = [v in A] qT + eta pT,
    // eta as accept_resample_kernel's targets_derive takes it (field 0 of the first launch)
    const double thr = token_thr(a.rule, alpha, X);
    const bool on_q = a.rule == kTokenV1;
    const double eta = thr == -INFINITY ? 0.0 : (thr > 0.0 ? 1.0 : sum_slices(sums, n, S, 0));
    for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) {
      const float xq = ld(R.q, R.q_dt, R.q_off + v);
      const float xp = ld(a.p, a.p_dtype, R.p_off + v);
      const double pt = static_cast<double>(expf((R.kp.apply(xp, v) - mp) * inv_t_f) * rp);
      const double pi = (in_a_logit(on_q ? xq : xp, on_q ? mq : mp, thr)
                             ? static_cast<double>(expf((R.kq.apply(xq, v) - mq) * inv_t_f) * rq)
                             : 0.0) + eta * pt;
      acc[1] += fmax(pt - pi, 0.0);
    }
  } else if (a.rule == kOpt || a.rule == kOptLog || (budget && a.rule != kLossy &&
                                                     !is_token(a.rule))) {
    // (with a budget also drafter and the other prefix rules: their cost is TV(pT, qT))
    // TV(pT, qT) = sum max(0, pT - qT), each difference as pT * -expm1(log qT - log pT)
    const float dm = static_cast<float>(static_cast<double>(mq) - mp);
    const float dl = static_cast<float>(log(X.qt) - log(X.pt));
    for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) {
      const float xq = R.kq.apply(ld(R.q, R.q_dt, R.q_off + v), v);
      const float xp = R.kp.apply(ld(a.p, a.p_dtype, R.p_off + v), v);
      const float pt = expf((xp - mp) * inv_t_f) * rp;
      if (pt > 0.0f) {  // (pT = 0: no contribution; also keeps -inf - -inf out)
        const float delta = fminf(((xq - xp) - dm) * inv_t_f - dl, 80.0f);
        const float d = -(pt * expm1f(delta));
        acc[0] += static_cast<double>(d > 0.0f ? d : 0.0f);
      }
    }
  } else if (is_token(a.rule)) {
    // eta = sum over tokens outside A of qT
    const double thr = token_thr(a.rule, alpha, X);
    const bool on_q = a.rule == kTokenV1;
    for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) {
      const float xq = ld(R.q, R.q_dt, R.q_off + v);
      const float xa = on_q ? xq : ld(a.p, a.p_dtype, R.p_off + v);
      if (!in_a_logit(xa, on_q ? mq : mp, thr))
        acc[0] += static_cast<double>(expf((R.kq.apply(xq, v) - mq) * inv_t_f) * rq);
    }
  } else {  // lossy, bonus row: sum max(0, qT - c pT) and sum max(0, pT - qT)
    const float c = static_cast<float>(1.0 / (1.0 - alpha));
    for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) {
      const float qt = expf((R.kq.apply(ld(R.q, R.q_dt, R.q_off + v), v) - mq) * inv_t_f) * rq;
      const float pt = expf((R.kp.apply(ld(a.p, a.p_dtype, R.p_off + v), v) - mp) * inv_t_f) * rp;
      const float x = qt - pt * c, y = pt - qt;
      acc[0] += static_cast<double>(x > 0.0f ? x : 0.0f);
      acc[1] += static_cast<double>(y > 0.0f ? y : 0.0f);
    }
  }
  block_sums<kWarps, 2>(acc, s_sum);
  if (threadIdx.x == 0) {
    if (!cost_pass) sums[(n * S + s) * 2] = acc[0];  // (the cost pass reads field 0)
    sums[(n * S + s) * 2 + 1] = acc[1];
  }
}

// ==== stage: targets (second launch, b: lossy_star's 1/beta) =====================================
// s solves h(s) = sum_{v: qT_v < c pT_v} max(0, s pT_v - qT_v) = D = sum_v max(0, qT_v - c pT_v),
// c = 1 / (1 - alpha) (equivalent to sum_v max(min(qT, c pT), s pT) = 1); h is non-decreasing.
// k-section on [0, c]: each pass evaluates h at kStarK interior points in one read of the row and
// keeps the sub-interval where h crosses D; the result is the upper end (the reference's
// bisection returns its upper end too), capped at c. D <= 0: s = 0 (pi = qT).
__global__ void __launch_bounds__(kStarThreads)
    targets_lossy_star_kernel(sc_verify_args a, int S, const SliceStats* __restrict__ ws,
                              double* __restrict__ sstar, double* __restrict__ cost) {
  __shared__ PosInfo s_info;
  __shared__ double s_sum[kStarWarps * kStarK];
  const int64_t n = blockIdx.x;
  const int64_t G1 = a.gamma + 1;
  const int64_t b = n / G1, j = n % G1;
  const double t = a.temperature[b];
  const Rows R = rows_of(a, b, j);
  // uniform over the block (T = 0: closed form in accept_resample_kernel; inactive positions
  // have no q)
  if (!(t > 0.0) || !R.has_q) return;
  const double inv_t = 1.0 / t;
  const float inv_t_f = static_cast<float>(fmin(inv_t, static_cast<double>(FLT_MAX)));
  const double c = 1.0 / (1.0 - a.alpha[b]);
  const float cf = static_cast<float>(c);
  if (threadIdx.x < 32) {
    const PosInfo X = merge_pos(ws, n, S, inv_t, false);
    if (threadIdx.x == 0) s_info = X;
  }
  __syncthreads();
  const float mq = s_info.mq, mp = s_info.mp;
  const float rq = static_cast<float>(1.0 / s_info.qt), rp = static_cast<float>(1.0 / s_info.pt);

  double dsum[1] = {0.0};
  for (int64_t v = threadIdx.x; v < a.V; v += kStarThreads) {
    const float qt = expf((R.kq.apply(ld(R.q, R.q_dt, R.q_off + v), v) - mq) * inv_t_f) * rq;
    const float pt = expf((R.kp.apply(ld(a.p, a.p_dtype, R.p_off + v), v) - mp) * inv_t_f) * rp;
    const float w = qt - cf * pt;
    dsum[0] += static_cast<double>(w > 0.0f ? w : 0.0f);
  }
  block_sums<kStarWarps, 1>(dsum, s_sum);
  const double D = dsum[0];
  double lo = 0.0, hi = c;
  if (D > 0.0) {
    for (int pass = 0; pass < kStarPasses; ++pass) {  // same trip count in every thread
      double cand[kStarK];
      float candf[kStarK];
      double h[kStarK];
#pragma unroll
      for (int k = 0; k < kStarK; ++k) {
        cand[k] = lo + (hi - lo) * static_cast<double>(k + 1) / static_cast<double>(kStarK + 1);
        candf[k] = static_cast<float>(cand[k]);
        h[k] = 0.0;
      }
      for (int64_t v = threadIdx.x; v < a.V; v += kStarThreads) {
        const float qt = expf((R.kq.apply(ld(R.q, R.q_dt, R.q_off + v), v) - mq) * inv_t_f) * rq;
        const float pt = expf((R.kp.apply(ld(a.p, a.p_dtype, R.p_off + v), v) - mp) * inv_t_f) * rp;
        if (qt < cf * pt) {
#pragma unroll
          for (int k = 0; k < kStarK; ++k) {
            const float w = candf[k] * pt - qt;
            h[k] += static_cast<double>(w > 0.0f ? w : 0.0f);
          }
        }
      }
      block_sums<kStarWarps, kStarK>(h, s_sum);
      int first = kStarK;  // first candidate where h reaches D (identical in every thread)
      for (int k = kStarK - 1; k >= 0; --k)
        if (h[k] >= D) first = k;
      const double nlo = first == 0 ? lo : cand[first - 1];
      const double nhi = first == kStarK ? hi : cand[first];
      lo = nlo;
      hi = nhi;
    }
  } else {
    hi = 0.0;
  }
  const double s_final = hi < c ? hi : c;
  if (a.budget != nullptr) {  // the position's cost sum max(0, pT - pi): one more read
    const double sf = s_final;
    double csum[1] = {0.0};
    for (int64_t v = threadIdx.x; v < a.V; v += kStarThreads) {
      const float qt = expf((R.kq.apply(ld(R.q, R.q_dt, R.q_off + v), v) - mq) * inv_t_f) * rq;
      const float pt = expf((R.kp.apply(ld(a.p, a.p_dtype, R.p_off + v), v) - mp) * inv_t_f) * rp;
      const double ptd = static_cast<double>(pt);
      const double pi = fmax(fmin(static_cast<double>(qt), ptd / (1.0 - a.alpha[b])), sf * ptd);
      csum[0] += fmax(ptd - pi, 0.0);
    }
    block_sums<kStarWarps, 1>(csum, s_sum);
    if (threadIdx.x == 0) cost[n] = csum[0];
  }
  if (threadIdx.x == 0) sstar[n] = s_final;
}

// ==== stages: end of targets + accept + resample + insert (last launch) ========================
struct Cand {
  double main_score;
  long long main_idx;
  double kept_score;
  long long kept_idx;
};

struct Req {
  double t, alpha;
  int64_t seed, pos;
  bool cascade;
};

// qT / pT of logit l at token v: softmax(l / T)[v] from the merged sums, or the one-hot of the
// argmax at T = 0 (verify_cpu.cpp's prob_t, the same expression).
__device__ __forceinline__ double prob_t(float l, float m, int arg, double st, double t,
                                         int64_t v) {
  if (t == 0.0) return v == arg ? 1.0 : 0.0;
  const double y = static_cast<double>(l) / t - static_cast<double>(m) / t;
  return exp(y) / st;
}

__device__ __forceinline__ int pi_mode(int rule, const PosFull& X) {
  if (X.exact) return kPiP;  // the divergence budget's exact positions: spec
  switch (rule) {
    case kSpec: return kPiP;
    case kDrafter: return kPiQ;
    case kLossy: return kPiLossy;
    case kLossyStar: return kPiLStar;
    default: break;
  }
  if (is_token(rule)) return kPiToken;
  return X.delta ? kPiP : kPiQ;
}

// The rule's accept(v) (= pi(v), except lossy: pT / (1 - alpha)).
__device__ __forceinline__ double accept_at(int mode, bool in_a, double qt, double pt,
                                            const PosFull& X, double alpha) {
  switch (mode) {
    case kPiQ: return qt;
    case kPiP: return pt;
    case kPiToken: return (in_a ? qt : 0.0) + X.eta * pt;
    case kPiLossy: return pt / (1.0 - alpha);
    default: return fmax(fmin(qt, pt / (1.0 - alpha)), X.sstar * pt);
  }
}

// Is token v in A at position X (token rules)? ql / pl: its logits.
__device__ __forceinline__ bool in_a_at(int rule, const PosFull& X, float ql, float pl) {
  return rule == kTokenV1 ? in_a_logit(ql, X.s.mq, X.thr) : in_a_logit(pl, X.s.mp, X.thr);
}

// The divergence budget's cost TV(pi, pT) = sum max(0, pT - pi) of a position with a draft row,
// once its decisions are taken (docs/semantics.md §9): prefix rules and drafter
// (1 - delta) TV(pT, qT); token rules the cost pass's sum; lossy max(0, tot - rm) (its law
// m + rm norm(max(0, pT - qT)) exceeds pT nowhere outside {pT > qT}); lossy_star the sum its
// kernel took. T = 0 (one-hot laws): 1 where pi is the one-hot of q's argmax and that is not
// p's, else 0 (lossy and lossy_star emit pT exactly there).
__device__ double position_cost(int rule, double t, const PosInfo& I, const PosFull& X,
                                int64_t n, int S, const double* sums, const double* cost) {
  const double differ = I.aq != I.ap ? 1.0 : 0.0;
  switch (rule) {
    case kSpec: return 0.0;
    case kLossy: return t == 0.0 ? 0.0 : fmax(sum_slices(sums, n, S, 1) - sum_slices(sums, n, S, 0), 0.0);
    case kLossyStar: return t == 0.0 ? 0.0 : cost[n];
    default: break;
  }
  if (is_token(rule)) return t == 0.0 ? (X.eta == 0.0 ? differ : 0.0) : sum_slices(sums, n, S, 1);
  if (X.delta) return 0.0;
  return t == 0.0 ? differ : sum_slices(sums, n, S, 0);
}

// targets: the decisions of position j of request b from its merged statistics (verify_cpu.cpp's
// targets_derive and targets_decide, without the shortcuts).
__device__ void targets_derive(const sc_verify_args& a, const Req& q, int64_t b, int64_t j, int S,
                               const double* sums, const double* sstar, const double* cost,
                               PosFull& X) {
  const int rule = a.rule;
  const int64_t n = b * (a.gamma + 1) + j;
  const Rows R = rows_of(a, b, j);
  const PosInfo& I = X.s;
  const double t = q.t, al = q.alpha;
  X.q_lst = t > 0.0 && R.has_q ? log(I.qt) : 0.0;
  X.p_lst = t > 0.0 ? log(I.pt) : 0.0;
  X.thr = -INFINITY;
  X.eta = 0.0;
  X.sstar = 0.0;
  X.rm = 0.0;
  X.tot = 0.0;
  X.delta = 0;
  X.cost = 0.0;
  X.charge = 0.0;
  X.exact = 0;
  if (!R.has_q) return;  // bonus="verifier" bonus position: pT only
  const double negent_q = I.qh / I.q1 - log(I.q1);
  const double negent_p = I.ph / I.p1 - log(I.p1);
  switch (rule) {
    case kChow: X.delta = 1.0 / I.q1 < 1.0 - al; break;
    case kChowLog: X.delta = -negent_q > al; break;
    case kDiff: X.delta = 1.0 / I.q1 < 1.0 / I.p1 - al; break;
    case kDiffLog: X.delta = negent_q < negent_p - al; break;
    case kOpt:
    case kOptLog: {
      const double tv = t == 0.0 ? (I.aq != I.ap ? 1.0 : 0.0) : sum_slices(sums, n, S, 0);
      const double lhs = rule == kOpt ? 1.0 / I.q1 : negent_q;
      const double top = rule == kOpt ? 1.0 / I.p1 : negent_p;
      X.delta = lhs < top - al * tv;
      break;
    }
    case kBild: {
      double d;
      if (t == 0.0) {
        const float pl = ld(a.p, a.p_dtype, R.p_off + I.aq);
        d = -(static_cast<double>(pl) - static_cast<double>(I.mp) - log(I.p1));
      } else {
        bool inf = false;
        if (I.masked != -INFINITY)
          inf = exp(static_cast<double>(I.masked) - static_cast<double>(I.mq)) / I.q1 > 0.0;
        d = inf ? INFINITY : log(I.p1) - I.cross / I.q1;
      }
      X.delta = d > al;
      break;
    }
    case kTokenV1:
    case kTokenV2:
    case kTokenV3: {
      X.thr = token_thr(rule, al, I);
      if (X.thr == -INFINITY) {
        X.eta = 0.0;  // A = everything
      } else if (X.thr > 0.0) {
        X.eta = 1.0;  // A = nothing (l - m <= 0)
      } else if (t == 0.0) {
        const float ql = ld(R.q, R.q_dt, R.q_off + I.aq);
        const float pl = ld(a.p, a.p_dtype, R.p_off + I.aq);
        X.eta = in_a_at(rule, X, ql, pl) ? 0.0 : 1.0;
      } else {
        X.eta = sum_slices(sums, n, S, 0);
      }
      break;
    }
    case kLossyStar:
      X.sstar = t == 0.0 ? (I.aq == I.ap ? 0.0 : 1.0) : sstar[n];
      break;
    case kLossy:
      if (j == gamma_of(a, b)) {  // (has_q here: bonus="cascade")
        if (t == 0.0) {
          X.rm = X.tot = I.aq == I.ap ? 0.0 : 1.0;
        } else {
          X.rm = sum_slices(sums, n, S, 0);
          X.tot = sum_slices(sums, n, S, 1);
        }
      }
      break;
    default: break;
  }
  if (a.budget != nullptr) X.cost = position_cost(rule, t, I, X, n, S, sums, cost);
}

__device__ __forceinline__ bool better_ll(double a, long long ia, double b, long long ib) {
  return better(a, static_cast<int64_t>(ia), b, static_cast<int64_t>(ib));
}

__global__ void __launch_bounds__(kThreads)
    accept_resample_kernel(sc_verify_args a, int64_t slice, int S,
                           const SliceStats* __restrict__ ws, const double* __restrict__ sums,
                           const double* __restrict__ sstar, const double* __restrict__ cost,
                           Cand* __restrict__ cands, unsigned* __restrict__ counters) {
  extern __shared__ PosFull s_pos[];  // a.gamma + 1 entries (this request uses gamma + 1)
  __shared__ double s_score[32];
  __shared__ int64_t s_idx[32];
  __shared__ int s_r;
  __shared__ bool s_last;

  const int64_t b = blockIdx.x;
  const int s = blockIdx.y;
  const int64_t G1 = a.gamma + 1;       // the padded width (workspace rows, output columns)
  const int64_t gamma = gamma_of(a, b);  // this request's drafts (= a.gamma when padded)
  const int rule = a.rule;
  Req q;
  q.t = a.temperature[b];
  q.alpha = a.alpha[b];
  q.seed = a.seed[b];
  q.pos = a.positions[b];
  q.cascade = a.rq == G1;
  const int64_t rows = q.cascade ? gamma + 1 : gamma;  // positions with a draft row
  const double inv_t = q.t > 0.0 ? 1.0 / q.t : 1.0;
  const bool cross = rule == kBild && q.t > 0.0;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // --- stage: targets (end): merged statistics of the request's positions (one warp each) ---
  for (int64_t j = warp; j <= gamma; j += kWarps) {
    const PosInfo X = merge_pos(ws, b * G1 + j, S, inv_t, cross && j < rows);
    if (lane == 0) s_pos[j].s = X;
  }
  __syncthreads();
  // --- stage: targets (end): decisions (one thread per position) ---
  for (int64_t j = threadIdx.x; j <= gamma; j += kThreads)
    targets_derive(a, q, b, j, S, sums, sstar, cost, s_pos[j]);
  __syncthreads();
  // --- stage: accept (thread 0): r = number of accepted drafts ---
  if (threadIdx.x == 0) {
    if (a.budget != nullptr) {
      // the divergence budget's scan (rules.budget_scan): in order, a position keeps the rule
      // and is charged its cost while the charges stay within the budget, else it is exact
      const double budget = a.budget[b];
      double spent = 0.0;
      for (int64_t j = 0; j < rows; ++j) {
        PosFull& X = s_pos[j];
        if (spent + X.cost <= budget) {
          X.charge = X.cost;
          spent += X.cost;
        } else {
          X.exact = 1;
        }
      }
    }
    int r = static_cast<int>(gamma);
    for (int64_t j = 0; j < gamma; ++j) {
      const int64_t x = x_at(a, b, j);
      if (x < 0 || x >= a.V) {  // (validated by the caller; never read out of bounds)
        r = static_cast<int>(j);
        break;
      }
      const PosFull& X = s_pos[j];
      const Rows R = rows_of(a, b, j);
      const float ql = ld(R.q, R.q_dt, R.q_off + x);
      const float pl = ld(a.p, a.p_dtype, R.p_off + x);
      const double u = uniform(row_key(q.seed, q.pos + j, kStreamAccept), 0);
      const double qt = prob_t(R.kq.apply(ql, x), X.s.mq, X.s.aq, X.s.qt, q.t, x);
      const double pt = prob_t(R.kp.apply(pl, x), X.s.mp, X.s.ap, X.s.pt, q.t, x);
      const int mode = pi_mode(rule, X);
      const bool ina = mode == kPiToken && in_a_at(rule, X, ql, pl);
      const double acc = accept_at(mode, ina, qt, pt, X, q.alpha);
      if (!(u < acc / fmax(qt, kQFloor))) {
        r = static_cast<int>(j);
        break;
      }
    }
    s_r = r;
  }
  __syncthreads();
  const int r = s_r;

  // --- stage: resample: the race over this block's slice of row r ---
  const PosFull& X = s_pos[r];
  const Rows R = rows_of(a, b, r);
  const int kind = r < gamma ? kRaceResidual : (q.cascade ? kRaceBonus : kRaceVerifier);
  const int mode = kind == kRaceVerifier ? kPiP : pi_mode(rule, X);
  const uint64_t key = row_key(q.seed, q.pos + r, kStreamResidual);
  const int64_t lo = static_cast<int64_t>(s) * slice;
  const int64_t hi = lo + slice < a.V ? lo + slice : a.V;
  double best = -INFINITY, kbest = -INFINITY;
  int64_t bi = INT64_MAX, kbi = INT64_MAX;
  for (int64_t v = lo + threadIdx.x; v < hi; v += kThreads) {
    const float pl = ld(a.p, a.p_dtype, R.p_off + v);
    const double pt = prob_t(R.kp.apply(pl, v), X.s.mp, X.s.ap, X.s.pt, q.t, v);
    double w, wk = 0.0;
    if (kind == kRaceVerifier) {
      w = pt;
    } else {
      const float ql = ld(R.q, R.q_dt, R.q_off + v);  // (kind != verifier: row r has q)
      const double qt = prob_t(R.kq.apply(ql, v), X.s.mq, X.s.aq, X.s.qt, q.t, v);
      const bool ina = mode == kPiToken && in_a_at(rule, X, ql, pl);
      const double acc = accept_at(mode, ina, qt, pt, X, q.alpha);
      const double kept = fmin(qt, acc);
      if (kind == kRaceResidual) {
        w = mode == kPiLossy ? fmax(pt - qt, 0.0) : fmax(acc - qt, 0.0);
        wk = kept;
      } else if (mode == kPiLossy) {
        const double res = fmax(pt - qt, 0.0);
        w = X.tot > 0.0 ? kept + X.rm * (res / X.tot) : kept;
      } else {
        w = acc;
      }
    }
    if (w > 0.0 || wk > 0.0) {
      const double g = log(-log(uniform(key, static_cast<uint64_t>(v))));
      if (w > 0.0) {
        const double sc = log(w) - g;
        if (better(sc, v, best, bi)) best = sc, bi = v;
      }
      if (wk > 0.0) {
        const double sc = log(wk) - g;
        if (better(sc, v, kbest, kbi)) kbest = sc, kbi = v;
      }
    }
  }
  block_argmax(best, bi, s_score, s_idx);
  block_argmax(kbest, kbi, s_score, s_idx);
  if (threadIdx.x == 0) {
    Cand c;
    c.main_score = best;
    c.main_idx = static_cast<long long>(bi);
    c.kept_score = kbest;
    c.kept_idx = static_cast<long long>(kbi);
    cands[b * S + s] = c;
    __threadfence();  // the candidate is visible device-wide before the ticket is taken
    const unsigned ticket = atomicAdd(&counters[b], 1u);
    s_last = ticket == static_cast<unsigned>(S - 1);
  }
  __syncthreads();
  if (!s_last || threadIdx.x != 0) return;  // (no barrier follows)

  // --- stage: resample (the last block of request b): merge the candidates in slice order ---
  __threadfence();
  double ms = -INFINITY, ks = -INFINITY;
  long long mi = INT64_MAX, ki = INT64_MAX;
  for (int k = 0; k < S; ++k) {
    const Cand* c = cands + b * S + k;
    const double cs = __ldcg(&c->main_score);
    const long long ci = __ldcg(&c->main_idx);
    const double cks = __ldcg(&c->kept_score);
    const long long cki = __ldcg(&c->kept_idx);
    if (cs > -INFINITY && better_ll(cs, ci, ms, mi)) ms = cs, mi = ci;
    if (cks > -INFINITY && better_ll(cks, cki, ks, ki)) ks = cks, ki = cki;
  }
  int64_t token;
  if (ms > -INFINITY) token = mi;
  else if (kind == kRaceResidual && ks > -INFINITY) token = ki;  // all-zero residual: the law
  else token = 0;  // every weight 0: torch.argmax of all -inf

  // --- stage: insert: the accepted drafts, the resampled / bonus token, -1 padding;
  // num_accepted; the deferred flags (reference._deferred) ---
  int64_t* tok = a.tokens + b * G1;
  uint8_t* def = a.deferred + b * G1;
  for (int64_t j = 0; j < G1; ++j) tok[j] = j < r ? x_at(a, b, j) : (j == r ? token : -1);
  a.num_accepted[b] = r;
  for (int64_t j = 0; j < G1; ++j) {
    bool d;
    if (j > gamma) {
      d = false;  // ragged: padding past this request's bonus position
    } else if (j >= rows) {
      d = true;  // bonus="verifier": the bonus token comes from the verifier
    } else if (s_pos[j].exact) {
      d = true;  // verified exactly under the divergence budget: the verifier decides
    } else if (is_prefix(rule)) {
      d = s_pos[j].delta != 0;
    } else if (is_token(rule)) {
      const int64_t v = j < gamma ? x_at(a, b, j) : token;
      const Rows Rj = rows_of(a, b, j);
      bool out_a = true;
      if (v >= 0 && v < a.V)
        out_a = !in_a_at(rule, s_pos[j], ld(Rj.q, Rj.q_dt, Rj.q_off + v),
                         ld(a.p, a.p_dtype, Rj.p_off + v));
      d = j < gamma ? out_a : (r == gamma && out_a);
    } else {
      d = rule != kDrafter;
    }
    def[j] = d ? 1 : 0;
  }
  if (a.spent != nullptr) {
    for (int64_t j = 0; j < G1; ++j) a.spent[b * G1 + j] = j < rows ? s_pos[j].charge : 0.0;
  }
}

// ---- host side ---------------------------------------------------------------------------------
int64_t next_pow2(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Vocabulary slice per block: about V / 32 (V / 128 for one request, V / 64 for two, so that
// accept_resample_kernel's B x S blocks still fill the GPU; never more: each of its blocks merges
// all S slices of its request's positions), a power of two in [1024, 8192] (B >= 4: V = 262,144
// gives 32 slices of 8192, V = 151,936 19; B = 1: 128 and 75 of 2048), or the whole of a small V.
int64_t slice_size(int64_t V, int64_t B) {
  const int64_t target = B >= 4 ? 32 : 128 / B;
  int64_t s = next_pow2((V + target - 1) / target);
  s = s < 1024 ? 1024 : s;
  s = s > 8192 ? 8192 : s;
  const int64_t whole = next_pow2(V);
  return s < whole ? s : whole;
}

size_t align256(size_t n) { return (n + 255) & ~static_cast<size_t>(255); }

struct Layout {
  int64_t slice, S, npos;
  size_t stats, sums, sstar, cost, cands, counters, total;
};

Layout layout(const sc_verify_args& a) {
  Layout L;
  L.slice = slice_size(a.V, a.B);
  L.S = (a.V + L.slice - 1) / L.slice;
  L.npos = a.B * (a.gamma + 1);
  size_t off = 0;
  L.stats = off;
  off += align256(sizeof(SliceStats) * static_cast<size_t>(L.npos * L.S));
  L.sums = off;
  off += align256(sizeof(double) * 2 * static_cast<size_t>(L.npos * L.S));
  L.sstar = off;
  off += align256(sizeof(double) * static_cast<size_t>(L.npos));
  L.cost = off;
  off += align256(sizeof(double) * static_cast<size_t>(a.budget != nullptr ? L.npos : 1));
  L.cands = off;
  off += align256(sizeof(Cand) * static_cast<size_t>(a.B * L.S));
  L.counters = off;
  off += align256(sizeof(unsigned) * static_cast<size_t>(a.B));
  L.total = off;
  return L;
}

}  // namespace
}  // namespace speccascade

extern "C" size_t sc_verify_workspace_bytes(const sc_verify_args* args) {
  return speccascade::layout(*args).total;
}

extern "C" cudaError_t sc_verify_padded_launch(const sc_verify_args* args, void* workspace,
                                               cudaStream_t stream) {
  using namespace speccascade;
  const sc_verify_args& a = *args;
  if (a.B < 1 || a.gamma < 1 || a.gamma > SC_VERIFY_MAX_GAMMA || a.V < 1 || a.V > INT_MAX ||
      (a.rq != a.gamma && a.rq != a.gamma + 1) || a.rule < 0 || a.rule >= kNumRules ||
      workspace == nullptr)
    return cudaErrorInvalidValue;
  // ragged: the bonus draft rows exist exactly for bonus="cascade"; padded: there are none
  if (a.cu != nullptr ? (a.qb != nullptr) != (a.rq == a.gamma + 1)
                      : (a.qb != nullptr || a.qb_keep != nullptr))
    return cudaErrorInvalidValue;
  // the divergence budget: padded layout only, with its output
  if (a.budget != nullptr && (a.cu != nullptr || a.spent == nullptr)) return cudaErrorInvalidValue;
  const Layout L = layout(a);
  if (L.npos > INT_MAX || a.B > INT_MAX || L.S > 65535) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  SliceStats* ws = reinterpret_cast<SliceStats*>(base + L.stats);
  double* sums = reinterpret_cast<double*>(base + L.sums);
  double* sst = reinterpret_cast<double*>(base + L.sstar);
  double* cost = reinterpret_cast<double*>(base + L.cost);
  Cand* cands = reinterpret_cast<Cand*>(base + L.cands);
  unsigned* counters = reinterpret_cast<unsigned*>(base + L.counters);
  const int S = static_cast<int>(L.S);

  targets_stats_kernel<<<dim3(static_cast<unsigned>(L.npos), S), kThreads, 0, stream>>>(
      a, L.slice, S, ws, counters);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int rule = a.rule;
  const bool budget = a.budget != nullptr;
  if (rule == kOpt || rule == kOptLog || is_token(rule) || (rule == kLossy && a.rq == a.gamma + 1) ||
      (budget && rule != kSpec && rule != kLossyStar)) {
    targets_second_pass_kernel<<<dim3(static_cast<unsigned>(L.npos), S), kThreads, 0, stream>>>(
        a, L.slice, S, ws, sums, 0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (budget && is_token(rule)) {  // the cost needs eta: a second pass over the rows
      targets_second_pass_kernel<<<dim3(static_cast<unsigned>(L.npos), S), kThreads, 0, stream>>>(
          a, L.slice, S, ws, sums, 1);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
  } else if (rule == kLossyStar) {
    targets_lossy_star_kernel<<<static_cast<unsigned>(L.npos), kStarThreads, 0, stream>>>(a, S, ws,
                                                                                          sst, cost);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const size_t smem = sizeof(PosFull) * static_cast<size_t>(a.gamma + 1);
  accept_resample_kernel<<<dim3(static_cast<unsigned>(a.B), S), kThreads, smem, stream>>>(
      a, L.slice, S, ws, sums, sst, cost, cands, counters);
  return cudaGetLastError();
}
