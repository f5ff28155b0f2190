// Fused speculative-cascade verification on CPU: the algorithm of the "cpu" backend's ops
// (torch.ops.speccascade.verify_ragged / verify_padded; their torch glue, argument checks and
// tensor plumbing are in verify_cpu_ops.cpp, the problem description in verify_cpu.h, the thread
// pool in task_queue.h).
//
// Semantics: exactly speccascade_fast/backends/reference.py (Algorithm 4 towards each rule's
// target, counter-based RNG of rng.py), in its stages, whose names every backend shares:
//
//   targets   per position, both models' distributions, the deferral decision and the target law:
//             - statistics: one streaming pass per (position, chunk of V): for the draft row q
//               and the target row p the max, its argmax, sum exp(l - m) (T = 1),
//               sum exp((l - m)/T), and, when the rule needs them, sum e (l - m) (entropy) and
//               sum e_q l_p (bild's cross entropy). Online softmax: a block raising the running
//               max rescales the sums once. Chunks are a fixed 16384 logits (not "per thread"),
//               so results do not depend on the thread count; (position, chunk) tasks are shared
//               by the calling thread and helpers on ATen's inter-op pool (task_queue.h).
//             - decisions from the statistics, and a second pass over V only where a rule needs
//               one: TV(pT, qT) for opt/opt_log (skipped when the decision cannot depend on it,
//               TV in [0, 1]); eta = qT(outside A) for token rules; lossy's bonus law;
//               lossy_star's beta, solved exactly (piecewise-linear equation, quickselect on
//               breakpoints, instead of the reference's 50 bisection passes).
//             Eager where every position needs them; lazy otherwise, computed when the accept or
//             resample stage reaches a position that needs them: for spec, drafter, lossy,
//             lossy_star and token_v3, whose outputs do not need every position, a position's
//             statistics are computed only when the accept loop reaches it (the rows after the
//             first rejection are never read; token_v3 reads their target rows' max only, for
//             the deferred flags); eta only at positions the accept loop reaches with a draft
//             outside A; beta only at the one row that resamples.
//   budget    only with a divergence budget (docs/semantics.md §9; the targets are then eager at
//             every position): each position's cost TV(pi, pT) from the targets' sums (one more
//             pass over V for the drafter and prefix rules' TV where opt did not make it, and for
//             token rules after eta where A holds many tokens), the scan along the block, and the
//             positions it makes exact verified as spec's (see stage_budget).
//   accept    per request, u_j = uniform(seed, position + j, ACCEPT) < accept_j(x) / qT_j(x),
//             fp64, stop at the first rejection j*.
//   resample  the exponential race argmax_v log w_v - log(-log u_v) over the single row that
//             needs it (the residual at j*, or the bonus row), split over V across threads. A
//             vectorised bound (a linear upper bound of log w from the logits plus a per-hash-
//             bucket bound of the Gumbel term) skips almost every token; the few survivors are
//             scored exactly in fp64 with the reference's formula, -log u evaluated in fp64 from
//             the exact 53-bit u (so E = -log u is accurate for u near 1).
//   insert    tokens / num_accepted / deferred, as reference._deferred.
//
// Numerics: softmax sums use a fp32 polynomial exp with fp64 accumulation (relative error
// ~1e-7); scalar per-token quantities (qT(x), pT(x), acceptance ratios, candidate weights) are
// fp64 from those sums. Tokens therefore equal the reference's except at genuine floating-point
// near-ties (a uniform within ~1e-7 relative of an acceptance ratio, two race scores within ~1e-7,
// a deferral statistic within ~1e-7 of its threshold), and for logit spreads beyond fp32 exp's
// range (> 87 nats below the row max the fp32 terms are 0; they are < 1e-38 of the sum).
// fp64 logits are not handled here: the Python backend sends those calls to the reference.
#include "verify_cpu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "../keep_bound.h"
#include "../rng.h"
#include "../sample_common.h"
#include "task_queue.h"

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#include "verify_kernels.h"
#pragma GCC pop_options

namespace speccascade {
namespace verify_cpu {

using namespace verify_kernels;
using task_queue::run_tasks;

// ---- rows ----------------------------------------------------------------------------------------
double Row::at(int64_t v) const {
  switch (dt) {
    case DType::kF32: return static_cast<const float*>(ptr)[v];
    case DType::kF16: return static_cast<float>(static_cast<const c10::Half*>(ptr)[v]);
    default: return static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[v]);
  }
}

const float* Row::load(int64_t lo, int n, float* buf) const {
  switch (dt) {
    case DType::kF32: return static_cast<const float*>(ptr) + lo;
    case DType::kBF16:
      convert_bf16(static_cast<const uint16_t*>(ptr) + lo, buf, n);
      return buf;
    default:
      convert_f16(static_cast<const uint16_t*>(ptr) + lo, buf, n);
      return buf;
  }
}

const float* Row::load_scaled(int64_t lo, int n, float* buf) const {
  const float* x = load(lo, n, buf);
  if (!keep.trunc) return x;
  truncate_block(x, buf, n, lo, keep.tau, keep.cut);
  return buf;
}

bool Row::kept(int64_t v) const { return keep.kept(static_cast<float>(at(v)), v); }

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr double kQFloor = 1e-10;      // rules.Q_FLOOR
constexpr int64_t kChunk = 16384;      // logits per task (fixed: results independent of threads)

bool is_prefix(int64_t r) { return (r >= kChow && r <= kOptLog) || r == kBild; }
bool is_token(int64_t r) { return r >= kTokenV1 && r <= kTokenV3; }

enum PiMode : uint8_t { kPiQ, kPiP, kPiToken, kPiLossy, kPiLStar };

// ---- merging per-row statistics (online softmax) -------------------------------------------------
// Move r's sums from max r.m to new_m >= r.m; returns the factor applied to unscaled sums.
double rescale(RowStats& r, float new_m, double inv_t) {
  const double dm = static_cast<double>(r.m) - static_cast<double>(new_m);
  const double c1 = std::exp(dm);
  r.h = c1 * (r.h + r.s1 * dm);
  r.s1 *= c1;
  r.st *= std::exp(dm * inv_t);
  r.m = new_m;
  return c1;
}

// Bring a position's partial statistics to the maxima (mq, mp) >= their own.
void lift(PosStats& x, float mq, float mp, double inv_t) {
  if (x.q.m != -kInfF && x.q.m < mq) {
    const double c = rescale(x.q, mq, inv_t);
    x.cross *= c;
    x.cross_s *= c;
  }
  if (x.p.m != -kInfF && x.p.m < mp) {
    x.cross -= (static_cast<double>(mp) - x.p.m) * x.cross_s;
    rescale(x.p, mp, inv_t);
  }
}

// a <- a + b, two partial statistics of the same position over consecutive chunks (a first).
void merge_pos(PosStats& a, PosStats b, double inv_t) {
  const float mq = std::max(a.q.m, b.q.m), mp = std::max(a.p.m, b.p.m);
  const int64_t aq = b.q.m > a.q.m ? b.q.arg : a.q.arg;  // ties: the lower id, in chunk a
  const int64_t ap = b.p.m > a.p.m ? b.p.arg : a.p.arg;
  lift(a, mq, mp, inv_t);
  lift(b, mq, mp, inv_t);
  a.q.m = mq, a.p.m = mp, a.q.arg = aq, a.p.arg = ap;
  a.q.s1 += b.q.s1, a.q.st += b.q.st, a.q.h += b.q.h;
  a.p.s1 += b.p.s1, a.p.st += b.p.st, a.p.h += b.p.h;
  a.cross += b.cross, a.cross_s += b.cross_s;
  a.masked_max = std::max(a.masked_max, b.masked_max);
}

// ---- the bucket bound table of the Gumbel term ----------------------------------------------------
struct BoundTable {
  alignas(64) float g[kBuckets];
  BoundTable() {
    for (int k = 0; k < kBuckets; ++k) {
      const double b = gumbel_bucket_bound(k);
      float f = static_cast<float>(b);
      if (static_cast<double>(f) < b) f = std::nextafter(f, kInfF);
      g[k] = f;
    }
  }
};
const float* bound_table() {
  static const BoundTable table;
  return table.g;
}

int64_t num_chunks(int64_t V) { return (V + kChunk - 1) / kChunk; }

// ---- scalar fp64 helpers (the reference's formulas) ------------------------------------------------
// qT(v) / pT(v): softmax(l / T)[v], or the one-hot of the argmax at T = 0.
double prob_t(const Row& r, const RowStats& s, const Request& R, int64_t v) {
  if (!r.present()) return 0.0;
  if (R.t == 0.0) return v == s.arg ? 1.0 : 0.0;
  if (!r.kept(v)) return 0.0;
  const double y = r.at(v) / R.t - static_cast<double>(s.m) / R.t;
  return std::exp(y) / s.st;
}

bool in_a(const Problem& P, const Position& X, int64_t v) {
  const bool on_q = P.rule == kTokenV1;
  const Row& r = on_q ? X.q : X.p;
  const float m = on_q ? X.st.q.m : X.st.p.m;
  return r.at(v) - static_cast<double>(m) >= X.thr_a;
}

PiMode pi_mode(const Problem& P, const Position& X) {
  if (X.exact) return kPiP;  // the divergence budget verifies it like spec
  switch (P.rule) {
    case kSpec: return kPiP;
    case kDrafter: return kPiQ;
    case kLossy: return kPiLossy;
    case kLossyStar: return kPiLStar;
    default: break;
  }
  if (is_token(P.rule)) return kPiToken;
  return X.delta ? kPiP : kPiQ;
}

// The rule's accept(v) (= pi(v), except lossy: pT / (1 - alpha)).
double accept_at(const Problem& P, const Request& R, const Position& X, PiMode mode, int64_t v,
                 double qt, double pt) {
  switch (mode) {
    case kPiQ: return qt;
    case kPiP: return pt;
    case kPiToken: return (in_a(P, X, v) ? qt : 0.0) + X.eta * pt;
    case kPiLossy: return pt / (1.0 - R.alpha);
    default: return std::max(std::min(qt, pt / (1.0 - R.alpha)), X.s * pt);
  }
}

// ==== stage: targets ==============================================================================
// Which sums each row's statistics pass accumulates (kS1, kH, kST; p_flags = -1: the target row
// is never read).
void targets_flags(const Problem& P, Position& X) {
  const Request& R = P.reqs[X.req];
  const int64_t r = P.rule;
  const bool s1_q = (r >= kChow && r <= kOptLog) || r == kBild || r == kTokenV1;
  const bool s1_p = (r >= kDiff && r <= kOptLog) || r == kBild || is_token(r);
  const bool h_q = r == kChowLog || r == kDiffLog || r == kOptLog;
  const bool h_p = r == kDiffLog || r == kOptLog;
  const bool scaled = R.t > 0.0;
  // the scaled sum is the unscaled one (targets_derive)
  const bool unit_q = R.t == 1.0 && !X.q.keep.trunc;
  const bool unit = R.t == 1.0 && !X.p.keep.trunc;
  if (X.q.present()) {
    X.q_flags = (s1_q || unit_q ? kS1 : 0) | (h_q ? kH : 0) | (scaled && !unit_q ? kST : 0);
    X.p_flags = (s1_p || unit ? kS1 : 0) | (h_p ? kH : 0) | (scaled && !unit ? kST : 0);
    X.need_cross = r == kBild && scaled;
    if (X.need_cross) X.q_flags |= kS1;
    if (r == kDrafter && !P.budget) X.p_flags = -1;  // the target row is never needed (no cost)
  } else {  // bonus=verifier bonus position: pT only
    X.p_flags = unit ? kS1 : (scaled ? kST : 0);
  }
  if (X.q_flags & kH) X.q_flags |= kS1;
  if (X.p_flags > 0 && (X.p_flags & kH)) X.p_flags |= kS1;
}

// -- statistics pass: (position, chunk) tasks --
// row_stats_block, with the scaled sum over the truncated block when the row is truncated (the
// unscaled sums, e1 and the max stay on the raw logits x); bt: scratch for the truncated block.
void row_stats(const Row& r, const float* x, int64_t lo, int n, float m, float inv_t, int flags,
               float* e1, float* w, float* bt, double* acc) {
  if (!r.keep.trunc || !(flags & kST)) {
    row_stats_block(x, n, m, inv_t, flags, e1, w, acc);
    return;
  }
  if (flags & ~kST) row_stats_block(x, n, m, inv_t, flags & ~kST, e1, w, acc);
  truncate_block(x, bt, n, lo, r.keep.tau, r.keep.cut);
  row_stats_block(bt, n, m, inv_t, kST, e1, w, acc);
}

// max_only: just the target row's max and argmax (token_v3's deferred flags at positions the
// accept loop never reached).
void targets_stats_chunk(const Position& X, const Request& R, int64_t lo, int64_t hi,
                         bool max_only, PosStats& out) {
  alignas(64) float bq[kBlock], bp[kBlock], e1[kBlock], w[kBlock], bt[kBlock];
  PosStats st;
  double accq[3] = {0, 0, 0}, accp[3] = {0, 0, 0}, accx[2] = {0, 0};
  auto sync_out = [&] {
    st.q.s1 = accq[0], st.q.st = accq[1], st.q.h = accq[2];
    st.p.s1 = accp[0], st.p.st = accp[1], st.p.h = accp[2];
    st.cross = accx[0], st.cross_s = accx[1];
  };
  auto sync_in = [&] {
    accq[0] = st.q.s1, accq[1] = st.q.st, accq[2] = st.q.h;
    accp[0] = st.p.s1, accp[1] = st.p.st, accp[2] = st.p.h;
    accx[0] = st.cross, accx[1] = st.cross_s;
  };
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, hi - b));
    const float* xq = X.q.present() && !max_only ? X.q.load(b, n, bq) : nullptr;
    const float* xp = X.p_flags >= 0 ? X.p.load(b, n, bp) : nullptr;
    // raise the running maxima to this block's (online softmax), rescaling the sums once
    const float bmq = xq ? block_max(xq, n) : -kInfF;
    const float bmp = xp ? block_max(xp, n) : -kInfF;
    const bool up_q = bmq > st.q.m, up_p = bmp > st.p.m;
    if (up_q || up_p) {
      sync_out();
      lift(st, std::max(st.q.m, bmq), std::max(st.p.m, bmp), R.inv_t);
      if (up_q) {
        st.q.m = bmq;
        int i = 0;
        while (xq[i] != bmq) ++i;
        st.q.arg = b + i;
      }
      if (up_p) {
        st.p.m = bmp;
        int i = 0;
        while (xp[i] != bmp) ++i;
        st.p.arg = b + i;
      }
      sync_in();
    }
    if (xq && st.q.m != -kInfF) {
      row_stats(X.q, xq, b, n, st.q.m, R.inv_t_f, X.q_flags, e1, w, bt, accq);
      if (X.need_cross && st.p.m != -kInfF)
        cross_block(e1, xq, xp, n, st.p.m, w, accx, &st.masked_max);
      else if (X.need_cross)  // every target logit so far is -inf: all are masked tokens
        st.masked_max = std::max(st.masked_max, block_max(xq, n));
    }
    if (xp && st.p.m != -kInfF && !max_only)
      row_stats(X.p, xp, b, n, st.p.m, R.inv_t_f, X.p_flags, e1, w, bt, accp);
  }
  sync_out();
  out = st;
}

// Token-rule threshold of A (see in_a), from the position's statistics.
void targets_derive(const Problem& P, Position& X) {
  const Request& R = P.reqs[X.req];
  if (R.t > 0.0) {
    if (R.t == 1.0 && !X.q.keep.trunc) X.st.q.st = X.st.q.s1;  // T = 1, untruncated: scaled = unscaled
    if (R.t == 1.0 && !X.p.keep.trunc) X.st.p.st = X.st.p.s1;
    X.q_lst = std::log(X.st.q.st);
    X.p_lst = std::log(X.st.p.st);
  }
  if (!X.q.present() || !is_token(P.rule)) return;  // (bonus=verifier bonus position: no A)
  const double a = R.alpha;
  double cth;
  if (P.rule == kTokenV3) cth = 1.0 - a;
  else if (P.rule == kTokenV2) cth = 1.0 - a * X.st.p.s1;
  else cth = X.st.q.s1 * (1.0 / X.st.p.s1 - a);
  X.thr_a = cth <= 0.0 ? -kInf : std::log(cth);
  if (X.thr_a == -kInf) X.eta = 0.0, X.has_eta = true;       // A = everything
  else if (X.thr_a > 0.0) X.eta = 1.0, X.has_eta = true;     // A = nothing (l - m <= 0)
  else if (R.t == 0.0) X.eta = in_a(P, X, X.st.q.arg) ? 0.0 : 1.0, X.has_eta = true;
}

// The statistics pass for the positions listed: (position, chunk) tasks, merged in chunk order.
void targets_stats(Problem& P, const std::vector<int64_t>& which, bool max_only = false) {
  if (which.empty()) return;
  const int64_t V = P.V, nc = num_chunks(V), n = static_cast<int64_t>(which.size());
  std::vector<PosStats> partial(static_cast<size_t>(n * nc));
  run_tasks(n * nc, n * V * (max_only ? 1 : 2), [&](int64_t t) {
    const Position& X = P.pos[which[t / nc]];
    const int64_t lo = (t % nc) * kChunk, hi = std::min(V, lo + kChunk);
    targets_stats_chunk(X, P.reqs[X.req], lo, hi, max_only, partial[t]);
  });
  for (int64_t i = 0; i < n; ++i) {
    Position& X = P.pos[which[i]];
    PosStats st = partial[i * nc];
    for (int64_t c = 1; c < nc; ++c) merge_pos(st, partial[i * nc + c], P.reqs[X.req].inv_t);
    if (max_only) {
      X.st.p.m = st.p.m, X.st.p.arg = st.p.arg;
    } else {
      X.st = st;
      X.has_stats = true;
      targets_derive(P, X);
    }
  }
}

// -- decisions --
// delta for prefix rules; returns whether TV is still needed (opt/opt_log, T > 0, ambiguous).
bool targets_decide(const Problem& P, Position& X, bool tv_known) {
  const Request& R = P.reqs[X.req];
  const double a = R.alpha;
  const RowStats& q = X.st.q;
  const RowStats& p = X.st.p;
  auto q1max = [&] { return 1.0 / q.s1; };
  auto p1max = [&] { return 1.0 / p.s1; };
  auto negent = [](const RowStats& r) { return r.h / r.s1 - std::log(r.s1); };
  switch (P.rule) {
    case kChow: X.delta = q1max() < 1.0 - a; return false;
    case kChowLog: X.delta = -negent(q) > a; return false;
    case kDiff: X.delta = q1max() < p1max() - a; return false;
    case kDiffLog: X.delta = negent(q) < negent(p) - a; return false;
    case kBild: {
      double d;
      if (R.t == 0.0) {
        d = -(X.q.present() ? X.p.at(q.arg) - p.m - std::log(p.s1) : 0.0);
      } else {
        bool inf = false;
        if (X.st.masked_max != -kInfF)
          inf = std::exp(static_cast<double>(X.st.masked_max) - q.m) / q.s1 > 0.0;
        d = inf ? kInf : std::log(p.s1) - X.st.cross / q.s1;
      }
      X.delta = d > a;
      return false;
    }
    case kOpt:
    case kOptLog: {
      const double lhs = P.rule == kOpt ? q1max() : negent(q);
      const double top = P.rule == kOpt ? p1max() : negent(p);
      if (R.t == 0.0 && !tv_known) X.tv = q.arg != p.arg ? 1.0 : 0.0, tv_known = X.has_tv = true;
      if (!tv_known) {
        if (a == 0.0) {
          X.delta = lhs < top;
          return false;
        }
        const double lo = std::min(top, top - a), hi = std::max(top, top - a);
        const double eps = 1e-9 * (1.0 + std::fabs(a) + std::fabs(top));
        if (lhs < lo - eps) { X.delta = true; return false; }
        if (lhs >= hi + eps) { X.delta = false; return false; }
        return true;
      }
      X.delta = lhs < top - a * X.tv;
      return false;
    }
    default:
      return false;
  }
}

// -- second passes, and the statistics the later stages reach lazily --
enum NeedKind : uint8_t { kNeedStats, kNeedTV, kNeedEta, kNeedLossy, kNeedLStar, kNeedCost };

struct Need {
  int64_t pos;
  NeedKind kind;
};

// A token rule's eta pass in a budget call, per chunk: the (qT, pT) pairs of the tokens of A with
// pT > qT (at most kMaxSplit; more: overflow, and the cost takes its own pass).
constexpr size_t kMaxSplit = 1024;
struct TokenSplit {
  std::vector<float> pairs;
  bool overflow = false;
};

void targets_sum_chunk(const Problem& P, const Need& nd, int64_t lo, int64_t hi, double* out,
                       TokenSplit* split = nullptr) {
  const Position& X = P.pos[nd.pos];
  const Request& R = P.reqs[X.req];
  alignas(64) float bq[kBlock], bp[kBlock], ba[kBlock], w[kBlock], w2[kBlock];
  const float mq = X.st.q.m, mp = X.st.p.m;
  const float rq = static_cast<float>(1.0 / X.st.q.st), rp = static_cast<float>(1.0 / X.st.p.st);
  const bool token_on_q = P.rule == kTokenV1;
  // qT reads the (truncated) scaled blocks; A's membership (eta) the raw logits of its row
  const Row& ra = token_on_q ? X.q : X.p;
  const bool a_shares_q = nd.kind == kNeedEta && token_on_q && !X.q.keep.trunc;
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, hi - b));
    const float* xq = X.q.load_scaled(b, n, bq);
    if (nd.kind == kNeedCost) {  // both scaled rows, and A's row raw (shared when untruncated)
      const float* xp = X.p.load_scaled(b, n, bp);
      const float* xa = !ra.keep.trunc ? (token_on_q ? xq : xp) : ra.load(b, n, ba);
      out[0] += token_cost_block(xa, token_on_q ? mq : mp, X.thr_a, xq, xp, n, mq, mp,
                                 R.inv_t_f, rq, rp, static_cast<float>(1.0 - X.eta), w);
      continue;
    }
    const float* xp = a_shares_q ? xq
                      : nd.kind == kNeedEta ? ra.load(b, n, bp) : X.p.load_scaled(b, n, bp);
    switch (nd.kind) {
      case kNeedTV:
        out[0] += tv_block(xq, xp, n, mp, R.inv_t_f, rp,
                           static_cast<float>(static_cast<double>(mq) - mp),
                           static_cast<float>(X.q_lst - X.p_lst), w);
        break;
      case kNeedEta:
        if (split == nullptr) {
          out[0] += eta_block(xp, token_on_q ? mq : mp, X.thr_a, xq, n, mq, R.inv_t_f, rq, w);
        } else {  // and the sums of the cost, which needs eta
          alignas(64) float qt[kBlock], pt[kBlock], flag[kBlock];
          const float* xpt = !token_on_q && !X.p.keep.trunc ? xp : X.p.load_scaled(b, n, ba);
          double more[2] = {0.0, 0.0};
          out[0] += eta_split_block(xp, token_on_q ? mq : mp, X.thr_a, xq, xpt, n, mq, mp,
                                    R.inv_t_f, rq, rp, qt, pt, w, w2, flag, more);
          out[1] += more[0];
          if (more[1] > 0.0 && !split->overflow) {
            if (split->pairs.size() / 2 + static_cast<size_t>(more[1]) > kMaxSplit) {
              split->overflow = true;
            } else {
              for (int i = 0; i < n; ++i)
                if (flag[i] > 0.0f) split->pairs.push_back(qt[i]), split->pairs.push_back(pt[i]);
            }
          }
        }
        break;
      case kNeedLossy:
        lossy_block(xq, xp, n, mq, mp, R.inv_t_f, rq, rp,
                    static_cast<float>(1.0 / (1.0 - R.alpha)), w, w2, out);
        break;
      default:
        break;
    }
  }
}

// lossy_star at one position: s = 1 / beta solving sum_v max(m_v, s pT_v) = 1 with
// m = min(qT, pT / (1 - alpha)). Equivalently (sum qT = 1)
//     h(s) = sum_{v : qT_v < c pT_v} max(0, s pT_v - qT_v) = D = sum_v max(0, qT_v - c pT_v),
// c = 1 / (1 - alpha); h is piecewise linear in s with breakpoints t_v = qT_v / pT_v < c, so the
// root is found exactly by a quickselect over the breakpoints (expected O(V)) and one division.
//
// cost (nullptr: not asked): the divergence cost sum max(0, pT - pi) from the same breakpoint
// arrays, without a pass over the logits: it is 0 where qT >= c pT (pi >= c pT >= pT), and
// max(0, pT - max(qT, s pT)) at the stored tokens. At T = 0 it is 0 (pi is pT's one-hot, or qT = pT).
double targets_lossy_star(const Problem& P, const Position& X, const Request& R, double* cost) {
  if (cost) *cost = 0.0;
  if (R.t == 0.0) return X.st.q.arg == X.st.p.arg ? 0.0 : 1.0;  // one-hot rows
  const int64_t V = P.V;
  const double c = 1.0 / (1.0 - R.alpha);
  const float cf = static_cast<float>(c);
  const float rq = static_cast<float>(1.0 / X.st.q.st), rp = static_cast<float>(1.0 / X.st.p.st);
  std::vector<float> tb, pb, qb;
  tb.reserve(static_cast<size_t>(V));
  pb.reserve(static_cast<size_t>(V));
  qb.reserve(static_cast<size_t>(V));
  alignas(64) float bq[kBlock], bp[kBlock], qt[kBlock], pt[kBlock], w[kBlock];
  double D = 0.0;
  for (int64_t b = 0; b < V; b += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, V - b));
    probs_block(X.q.load_scaled(b, n, bq), n, X.st.q.m, R.inv_t_f, rq, qt);
    probs_block(X.p.load_scaled(b, n, bp), n, X.st.p.m, R.inv_t_f, rp, pt);
    D += deficit_block(qt, pt, n, cf, w);
    for (int i = 0; i < n; ++i) {
      if (qt[i] < cf * pt[i]) {
        tb.push_back(qt[i] / pt[i]);
        pb.push_back(pt[i]);
        qb.push_back(qt[i]);
      }
    }
  }
  auto cost_at = [&](double s) {
    if (!cost) return;
    double acc = 0.0;
    for (size_t k = 0; k < pb.size(); ++k) {
      const double p = pb[k];
      acc += std::max(0.0, p - std::max(static_cast<double>(qb[k]), s * p));
    }
    *cost = acc;
  };
  if (!(D > 0.0)) {
    cost_at(0.0);
    return 0.0;
  }
  // quickselect on t: elements [lo, hi) are undecided; (acc_p, acc_q) sum the ones known active.
  size_t lo = 0, hi = tb.size();
  double acc_p = 0.0, acc_q = 0.0;
  uint64_t rs = 0x9E3779B97F4A7C15ULL;
  auto swap3 = [&](size_t a, size_t b) {
    std::swap(tb[a], tb[b]);
    std::swap(pb[a], pb[b]);
    std::swap(qb[a], qb[b]);
  };
  while (hi - lo > 32) {
    rs = mix64(rs + 1);
    const float pivot = tb[lo + rs % (hi - lo)];
    // three-way partition: [lo, lt) < pivot, [lt, gt) == pivot, [gt, hi) > pivot
    size_t lt = lo, i = lo, gt = hi;
    while (i < gt) {
      if (tb[i] < pivot) swap3(lt++, i++);
      else if (tb[i] > pivot) swap3(i, --gt);
      else ++i;
    }
    double sp = 0.0, sq = 0.0;
    for (size_t k = lo; k < lt; ++k) sp += pb[k], sq += qb[k];
    const double h_at = (acc_p + sp) * pivot - (acc_q + sq);
    if (h_at < D) {  // root above the pivot: everything <= pivot is active there
      for (size_t k = lt; k < gt; ++k) sp += pb[k], sq += qb[k];
      acc_p += sp;
      acc_q += sq;
      lo = gt;
    } else {  // root at or below the pivot: only the elements below it can be active
      hi = lt;
    }
  }
  std::vector<size_t> order;
  for (size_t k = lo; k < hi; ++k) order.push_back(k);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return tb[a] < tb[b]; });
  double s = acc_p > 0.0 ? (D + acc_q) / acc_p : kInf;
  for (size_t k = 0; k < order.size(); ++k) {
    if (s <= tb[order[k]]) break;  // the root lies before this breakpoint
    acc_p += pb[order[k]];
    acc_q += qb[order[k]];
    s = (D + acc_q) / acc_p;
  }
  s = std::min(s, c);
  cost_at(s);  // (the arrays are permuted, pairs kept together: the sum's order is fixed)
  return s;
}

// Meet every need: statistics passes (kNeedStats), second-pass sums (kNeedTV / kNeedEta /
// kNeedLossy, chunked over V) and lossy_star's s (kNeedLStar, one task per row).
void targets_meet_needs(Problem& P, const std::vector<Need>& needs) {
  if (needs.empty()) return;
  const int64_t nc = num_chunks(P.V);
  std::vector<Need> sums, lstar;
  std::vector<int64_t> stats;
  for (const Need& n : needs) {
    if (n.kind == kNeedStats) stats.push_back(n.pos);
    else (n.kind == kNeedLStar ? lstar : sums).push_back(n);
  }
  targets_stats(P, stats);
  const int64_t ntasks = static_cast<int64_t>(sums.size()) * nc + static_cast<int64_t>(lstar.size());
  std::vector<double> partial(static_cast<size_t>(sums.size() * nc * 2), 0.0);
  std::vector<double> svals(lstar.size(), 0.0), cvals(lstar.size(), 0.0);
  // budget calls of token rules: the eta pass also gathers what the cost needs
  const bool split = P.budget && is_token(P.rule);
  std::vector<TokenSplit> splits(split ? sums.size() * nc : 0);
  run_tasks(ntasks, ntasks * std::min<int64_t>(P.V, kChunk) * 2, [&](int64_t t) {
    const int64_t ns = static_cast<int64_t>(sums.size()) * nc;
    if (t < ns) {
      const Need& nd = sums[t / nc];
      const int64_t lo = (t % nc) * kChunk, hi = std::min(P.V, lo + kChunk);
      targets_sum_chunk(P, nd, lo, hi, &partial[2 * t],
                        split && nd.kind == kNeedEta ? &splits[t] : nullptr);
    } else {
      const Need& nd = lstar[t - ns];
      const Position& X = P.pos[nd.pos];
      svals[t - ns] = targets_lossy_star(P, X, P.reqs[X.req], P.budget ? &cvals[t - ns] : nullptr);
    }
  });
  for (size_t i = 0; i < sums.size(); ++i) {
    double a = 0.0, b = 0.0;
    for (int64_t c = 0; c < nc; ++c) a += partial[2 * (i * nc + c)], b += partial[2 * (i * nc + c) + 1];
    Position& X = P.pos[sums[i].pos];
    switch (sums[i].kind) {
      case kNeedTV: X.tv = a, X.has_tv = true; break;
      case kNeedEta:
        X.eta = a, X.has_eta = true;
        if (split) {  // cost = (1 - eta) pT(outside A) + sum over A of max(0, (1 - eta) pT - qT)
          const double keep = std::max(0.0, 1.0 - a);
          double c = keep * b;
          bool overflow = false;
          for (int64_t k = 0; k < nc; ++k) {
            const TokenSplit& sp = splits[i * nc + k];
            overflow |= sp.overflow;
            for (size_t m = 0; m + 1 < sp.pairs.size(); m += 2)
              c += std::max(0.0, keep * sp.pairs[m + 1] - static_cast<double>(sp.pairs[m]));
          }
          if (!overflow) X.cost = c, X.has_cost = true;  // else the cost pass (stage_budget)
        }
        break;
      case kNeedLossy: X.rm = a, X.tot = b, X.has_lossy = true; break;
      case kNeedCost: X.cost = a, X.has_cost = true; break;
      default: break;
    }
  }
  for (size_t i = 0; i < lstar.size(); ++i) {
    Position& X = P.pos[lstar[i].pos];
    X.s = svals[i], X.has_s = true;
    if (P.budget) X.cost = cvals[i], X.has_cost = true;
  }
}

// The eager part of targets: every row's flags; the statistics of every position (of the first
// one only, for the lazy rules); the prefix rules' decisions, with TV where it decides.
void stage_targets(Problem& P) {
  const int64_t npos = static_cast<int64_t>(P.pos.size());
  for (Position& X : P.pos) targets_flags(P, X);

  // Rules whose deferred flags do not need every position (spec, drafter, lossy, lossy_star,
  // token_v3) compute the statistics lazily, as the accept loop reaches each position: the rows
  // after the first rejection are never read.
  // With a divergence budget every position's cost is needed (the scan runs over the block):
  // eager for every rule.
  const bool lazy = !P.budget && (P.rule == kSpec || P.rule == kDrafter || P.rule == kLossy ||
                                  P.rule == kLossyStar || P.rule == kTokenV3);
  {
    std::vector<int64_t> first;
    for (int64_t i = 0; i < npos; ++i)
      if (!lazy || P.pos[i].j == 0) first.push_back(i);
    targets_stats(P, first);
  }

  // deferral decisions, TV where it decides (prefix rules: every position has statistics)
  if (is_prefix(P.rule)) {
    std::vector<Need> tv;
    for (int64_t i = 0; i < npos; ++i)
      if (P.pos[i].q.present() && targets_decide(P, P.pos[i], false)) tv.push_back({i, kNeedTV});
    targets_meet_needs(P, tv);
    for (const Need& n : tv) targets_decide(P, P.pos[n.pos], true);
  }
}

// ==== stage: budget ===============================================================================
// Only with a divergence budget (docs/semantics.md §9), after the eager targets: each position's
// cost c = TV(pi, pT) = sum max(0, pT - pi) on the truncated scaled laws, then the scan along
// each request's block. Costs, by rule (T = 0: one-hot laws, every cost in closed form):
//   spec, a prefix rule's deferral, a token rule whose A is empty: 0 (pi = pT);
//   drafter, a prefix rule's non-deferral: TV(qT, pT), one more pass over V (tv_block), which
//     opt / opt_log already made where it decided;
//   lossy: tot - rm from the sums of its bonus law (lossy_block, one pass, which the cascade's
//     bonus row makes anyway): where qT < pT the law is qT + rm (pT - qT) / tot, elsewhere it is
//     at least pT, and rm <= tot;
//   lossy_star: from the breakpoints its solve for beta keeps (no pass of its own);
//   token rules: pi = qT on A + eta pT, so the cost sum max(0, (1 - eta) pT - qT 1_A) is known
//     only once eta is. The eta pass (eta_split_block) also sums pT outside A, whose terms are
//     linear in eta, and keeps the (qT, pT) of the tokens of A with pT > qT, the only ones whose
//     terms can be positive: the cost follows without a pass where A holds few of them (token_v3,
//     small alpha); where a chunk holds more than kMaxSplit, one more pass (token_cost_block).
// The scan: S = 0; a position keeps its rule iff S + c <= budget (charged c, S += c), else it is
// verified exactly like spec (pi = pT, charged 0, deferred). A cost is a sum of fp32 terms in
// fp64 (error ~1e-7): a decision with S + c within that of the budget may differ from the
// reference's.
void stage_budget(Problem& P) {
  const int64_t npos = static_cast<int64_t>(P.pos.size());
  const int64_t r = P.rule;
  auto costed = [&](const Position& X) { return X.q.present() && P.reqs[X.req].t > 0.0; };
  auto wants_tv = [&](const Position& X) { return r == kDrafter || (is_prefix(r) && !X.delta); };
  std::vector<Need> needs;
  for (int64_t i = 0; i < npos; ++i) {
    const Position& X = P.pos[i];
    if (!costed(X)) continue;
    if (wants_tv(X) && !X.has_tv) needs.push_back({i, kNeedTV});
    else if (is_token(r) && !X.has_eta) needs.push_back({i, kNeedEta});
    else if (r == kLossy && !X.has_lossy) needs.push_back({i, kNeedLossy});
    else if (r == kLossyStar && !X.has_cost) needs.push_back({i, kNeedLStar});
  }
  targets_meet_needs(P, needs);
  if (is_token(r)) {
    needs.clear();
    for (int64_t i = 0; i < npos; ++i)
      if (costed(P.pos[i]) && P.pos[i].thr_a <= 0.0 && !P.pos[i].has_cost)
        needs.push_back({i, kNeedCost});
    targets_meet_needs(P, needs);
  }
  for (Position& X : P.pos) {
    if (!X.q.present()) continue;  // bonus="verifier": the bonus from pT costs nothing
    const bool greedy = P.reqs[X.req].t == 0.0;
    const double tv0 = X.st.q.arg != X.st.p.arg ? 1.0 : 0.0;  // TV of the one-hot laws
    double c = 0.0;
    if (wants_tv(X)) c = greedy ? tv0 : X.tv;
    else if (is_token(r)) c = greedy ? (1.0 - X.eta) * tv0 : X.thr_a > 0.0 ? 0.0 : X.cost;
    else if (r == kLossy) c = greedy ? 0.0 : std::max(0.0, X.tot - X.rm);
    else if (r == kLossyStar) c = greedy ? 0.0 : X.cost;
    X.cost = c;
  }
  for (const Request& R : P.reqs) {
    const int64_t rows = R.cascade ? R.gamma + 1 : R.gamma;
    double spent = 0.0;
    for (int64_t j = 0; j < rows; ++j) {
      Position& X = P.pos[R.first + j];
      if (spent + X.cost <= R.budget) {
        X.spent = X.cost;
        spent += X.cost;
      } else {
        X.exact = true;
      }
    }
  }
}

// ==== stage: accept ===============================================================================
// Advance request R through its drafts as far as the known quantities allow. Returns a need when
// blocked (the statistics, eta or s at the current position), nothing when resolved.
std::optional<Need> accept_advance(Problem& P, Request& R) {
  while (R.j < R.gamma) {
    const int64_t pi = R.first + R.j;
    const Position& X = P.pos[pi];
    if (!X.has_stats) return Need{pi, kNeedStats};
    const int64_t x = X.token;
    const double u =
        uniform(row_key(R.seed, R.position + R.j, kStreamAccept), 0);
    const double qt = prob_t(X.q, X.st.q, R, x);
    const double pt = prob_t(X.p, X.st.p, R, x);
    const PiMode mode = pi_mode(P, X);
    if (mode == kPiToken && !X.has_eta) {
      // x in A with qT(x) >= floor: accept(x) >= qT(x), ratio >= 1 > u: accepted whatever eta is
      if (in_a(P, X, x) && qt >= kQFloor && u < 1.0) {
        ++R.j;
        continue;
      }
      return Need{pi, kNeedEta};
    }
    if (mode == kPiLStar && !X.has_s) {
      const double m = std::min(qt, pt / (1.0 - R.alpha));
      if (m < qt) {
        // pi(x) = max(m, s pT(x)) = m, as s <= 1 / (1 - alpha)
        if (u < m / std::max(qt, kQFloor)) { ++R.j; continue; }
        R.resolved = true;
        return std::nullopt;
      }
      if (qt >= kQFloor && u < 1.0) { ++R.j; continue; }  // pi(x) >= qT(x): ratio >= 1
      return Need{pi, kNeedLStar};
    }
    const double acc = accept_at(P, R, X, mode, x, qt, pt);
    if (u < acc / std::max(qt, kQFloor)) {
      ++R.j;
      continue;
    }
    R.resolved = true;
    return std::nullopt;
  }
  R.resolved = true;
  return std::nullopt;
}

// Rounds: each round meets the needs (lazy targets) every blocked request asked for.
void stage_accept(Problem& P) {
  const int64_t threads = std::max<int64_t>(1, task_queue::num_threads());
  for (;;) {
    std::vector<Need> needs;
    for (Request& R : P.reqs) {
      if (R.resolved) continue;
      if (auto nd = accept_advance(P, R)) needs.push_back(*nd);
    }
    if (needs.empty()) break;
    // Lazy stats with fewer waiting requests than threads: also compute the next position of
    // each (it is needed unless this one rejects), so that a round has work for every thread and
    // a long accepted run takes half the rounds.
    const size_t n = needs.size();
    if (static_cast<int64_t>(n) < threads) {
      for (size_t i = 0; i < n; ++i) {
        const Need nd = needs[i];
        if (nd.kind != kNeedStats) continue;
        const Position& X = P.pos[nd.pos];
        const Request& R = P.reqs[X.req];
        if (X.j < R.gamma && !P.pos[nd.pos + 1].has_stats) needs.push_back({nd.pos + 1, kNeedStats});
      }
    }
    targets_meet_needs(P, needs);
  }
}

// ==== stage: resample =============================================================================
// The race weight w_v of the row R resamples from (its RaceKind), and its exact score.
double race_weight(const Problem& P, const Request& R, int64_t v) {
  const Position& X = P.pos[R.race_pos];
  const double pt = prob_t(X.p, X.st.p, R, v);
  if (R.kind == kRaceVerifier) return pt;
  const double qt = prob_t(X.q, X.st.q, R, v);
  const PiMode mode = pi_mode(P, X);
  const double acc = accept_at(P, R, X, mode, v, qt, pt);
  switch (R.kind) {
    case kRaceResidual:
      return mode == kPiLossy ? std::max(pt - qt, 0.0) : std::max(acc - qt, 0.0);
    case kRaceKept:
      return std::min(qt, acc);
    default:  // bonus: the law of the position
      if (mode == kPiLossy) {
        const double kept = std::min(qt, acc);
        const double res = std::max(pt - qt, 0.0);
        return X.tot > 0.0 ? kept + X.rm * (res / X.tot) : kept;
      }
      return acc;
  }
}

double exact_score(const Problem& P, const Request& R, int64_t v) {
  const double w = race_weight(P, R, v);
  if (!(w > 0.0)) return -kInf;
  const double u = uniform(R.key, static_cast<uint64_t>(v));
  return std::log(w) - std::log(-std::log(u));
}

// Choose the row and weights; return the need (lazy targets) that must be met first, if any.
std::optional<Need> resample_plan(Problem& P, Request& R) {
  const int64_t nacc = R.j;
  R.key = row_key(R.seed, R.position + nacc, kStreamResidual);
  R.race_pos = R.first + nacc;
  Position& X = P.pos[R.race_pos];
  if (!X.has_stats) return Need{R.race_pos, kNeedStats};
  if (nacc == R.gamma && !R.cascade) {
    R.kind = kRaceVerifier;
    return std::nullopt;
  }
  const PiMode mode = pi_mode(P, X);
  R.kind = nacc < R.gamma ? kRaceResidual : kRaceBonus;
  if (mode == kPiToken && !X.has_eta) return Need{R.race_pos, kNeedEta};
  if (mode == kPiLStar && !X.has_s) return Need{R.race_pos, kNeedLStar};
  if (mode == kPiLossy && R.kind == kRaceBonus && !X.has_lossy) {
    if (R.t == 0.0) {
      const bool same = X.st.q.arg == X.st.p.arg;
      X.rm = same ? 0.0 : 1.0, X.tot = same ? 0.0 : 1.0, X.has_lossy = true;
    } else {
      return Need{R.race_pos, kNeedLossy};
    }
  }
  return std::nullopt;
}

// Bound constants (log space): log w_v <= max(ca + log qT_v, cb + log pT_v).
void resample_bounds(const Problem& P, Request& R) {
  const Position& X = P.pos[R.race_pos];
  const double log2 = std::log(2.0);
  double ca = -kInf, cb = -kInf;
  const PiMode mode = R.kind == kRaceVerifier ? kPiP : pi_mode(P, X);
  auto lg = [](double v) { return v > 0.0 ? std::log(v) : -kInf; };
  if (R.kind == kRaceVerifier) {
    cb = 0.0;
  } else if (R.kind == kRaceKept) {
    ca = 0.0;
  } else if (R.kind == kRaceResidual) {
    switch (mode) {
      case kPiQ: break;  // residual is 0: never raced (the kept law is)
      case kPiP: case kPiLossy: cb = 0.0; break;
      case kPiToken: cb = lg(X.eta); break;
      default: cb = lg(X.s); break;
    }
  } else {
    switch (mode) {
      case kPiQ: ca = 0.0; break;
      case kPiP: cb = 0.0; break;
      case kPiToken: ca = log2, cb = log2 + lg(X.eta); break;
      case kPiLossy: ca = log2, cb = log2 + lg(X.tot > 0.0 ? X.rm / X.tot : 0.0); break;
      default: ca = 0.0, cb = lg(X.s); break;
    }
  }
  // the residual is identically 0: the reference falls back to the position's law, min(qT, accept)
  if (R.kind == kRaceResidual && ca == -kInf && cb == -kInf) {
    R.kind = kRaceKept;
    ca = 0.0;
  }
  // (ca = -inf with an empty row's -inf log-sum would give NaN: keep -inf)
  R.a0 = ca == -kInf || !X.q.present() ? -kInfF : static_cast<float>(ca - X.q_lst);
  R.b0 = cb == -kInf ? -kInfF : static_cast<float>(cb - X.p_lst);
}

struct Best {
  double score = -kInf;
  int64_t idx = -1;
  void consider(double s, int64_t v) {
    if (idx < 0 ? s > -kInf : better(s, v, score, idx)) score = s, idx = v;
  }
};

float prune_below(double best) {
  if (best == -kInf) return -kInfF;
  return static_cast<float>(best - 1e-3 - 1e-6 * std::fabs(best));
}

// The two modes (argmax q, argmax p), scored exactly: every chunk starts from this best, so a
// chunk holding no token that can beat it prunes from its first block (without the seed, a chunk
// where every weight is 0, e.g. outside A for a token rule, would score each token exactly).
Best resample_race_seed(const Problem& P, const Request& R) {
  const Position& X = P.pos[R.race_pos];
  Best best;
  for (int64_t v : {X.q.present() ? X.st.q.arg : X.st.p.arg, X.st.p.arg})
    best.consider(exact_score(P, R, v), v);
  return best;
}

Best resample_race_chunk(const Problem& P, const Request& R, const Best& seed, int64_t lo,
                         int64_t hi) {
  const Position& X = P.pos[R.race_pos];
  Best best = seed;
  if (R.t == 0.0) return best;  // one-hot rows: only the two modes can carry weight
  const float* table = bound_table();
  alignas(64) float bq[kBlock], bp[kBlock], val[kBlock];
  float thr = prune_below(best.score);
  const bool with_q = X.q.present() && R.a0 != -kInfF;
  const bool with_p = R.b0 != -kInfF;
  if (!with_q && !with_p) return best;  // every weight is 0
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, hi - b));
    const float* xq = with_q ? X.q.load_scaled(b, n, bq) : nullptr;
    const float* xp = with_p ? X.p.load_scaled(b, n, bp) : nullptr;
    const float bmax = race_bound_block(xq, xp, n, b, R.key, X.st.q.m, X.st.p.m, R.inv_t_f, R.a0,
                                        R.b0, table, val);
    if (!(bmax >= thr) || bmax == -kInfF) continue;
    for (int i = 0; i < n; ++i) {
      if (val[i] >= thr && val[i] > -kInfF) {
        const int64_t v = b + i;
        best.consider(exact_score(P, R, v), v);
        thr = prune_below(best.score);
      }
    }
  }
  return best;
}

void resample_races(Problem& P, std::vector<int64_t>& which) {
  if (which.empty()) return;
  const int64_t nc = num_chunks(P.V);
  std::vector<Best> partial(which.size() * nc), seeds(which.size());
  for (size_t i = 0; i < which.size(); ++i) seeds[i] = resample_race_seed(P, P.reqs[which[i]]);
  const int64_t n = static_cast<int64_t>(which.size()) * nc;
  run_tasks(n, n * std::min<int64_t>(P.V, kChunk), [&](int64_t t) {
    const Request& R = P.reqs[which[t / nc]];
    const int64_t lo = (t % nc) * kChunk, hi = std::min(P.V, lo + kChunk);
    partial[t] = resample_race_chunk(P, R, seeds[t / nc], lo, hi);
  });
  std::vector<int64_t> again;
  for (size_t i = 0; i < which.size(); ++i) {
    Best best;
    for (int64_t c = 0; c < nc; ++c) {
      const Best& b = partial[i * nc + c];
      if (b.idx >= 0) best.consider(b.score, b.idx);
    }
    Request& R = P.reqs[which[i]];
    if (best.idx < 0 && R.kind == kRaceResidual) {
      // every residual weight is 0: the reference draws from the position's law instead
      R.kind = kRaceKept;
      resample_bounds(P, R);
      again.push_back(which[i]);
      continue;
    }
    R.best_score = best.score;
    R.best_idx = best.idx < 0 ? 0 : best.idx;  // all weights 0: torch.argmax of all -inf is 0
  }
  resample_races(P, again);
}

// Rounds again (the row's statistics, then eta / beta / lossy's law where needed), then the race.
void stage_resample(Problem& P) {
  for (;;) {
    std::vector<Need> needs;
    for (Request& R : P.reqs)
      if (auto nd = resample_plan(P, R)) needs.push_back(*nd);
    if (needs.empty()) break;
    targets_meet_needs(P, needs);
  }
  std::vector<int64_t> which;
  for (int64_t b = 0; b < static_cast<int64_t>(P.reqs.size()); ++b) {
    resample_bounds(P, P.reqs[b]);
    which.push_back(b);
  }
  resample_races(P, which);
}

// ==== stage: insert ===============================================================================
// The output rows: the accepted drafts, the resampled / bonus token (the -1 padding after it is
// the caller's), num_accepted, and the deferred flags (reference._deferred).
void stage_insert(Problem& P, int64_t* tokens_out, int64_t out_cols, int64_t* nacc_out,
                  bool* deferred_out, double* spent_out) {
  const int64_t npos = static_cast<int64_t>(P.pos.size());
  // token_v3: whether each draft is in A needs its target row's max only, which the lazy
  // statistics passes skipped at the positions after the first rejection (the last of targets)
  if (P.rule == kTokenV3) {
    std::vector<int64_t> unread;
    for (int64_t i = 0; i < npos; ++i) {
      Position& X = P.pos[i];
      if (!X.has_stats && X.token >= 0) {
        unread.push_back(i);
        X.thr_a = 1.0 - P.reqs[X.req].alpha <= 0.0 ? -kInf : std::log(1.0 - P.reqs[X.req].alpha);
      }
    }
    targets_stats(P, unread, /*max_only=*/true);
  }
  for (int64_t b = 0; b < static_cast<int64_t>(P.reqs.size()); ++b) {
    const Request& R = P.reqs[b];
    int64_t* tok = tokens_out + b * out_cols;
    bool* def = deferred_out + b * out_cols;
    for (int64_t j = 0; j < R.j; ++j) tok[j] = P.pos[R.first + j].token;
    tok[R.j] = R.best_idx;
    nacc_out[b] = R.j;
    const int64_t rows = R.cascade ? R.gamma + 1 : R.gamma;
    for (int64_t j = 0; j < rows; ++j) {
      const Position& X = P.pos[R.first + j];
      bool d;
      if (is_prefix(P.rule)) d = X.delta;
      else if (is_token(P.rule)) d = j < R.gamma ? !in_a(P, X, X.token)
                                                 : R.j == R.gamma && !in_a(P, X, R.best_idx);
      else d = P.rule != kDrafter;
      def[j] = d || X.exact;  // a position the budget made exact always involves the verifier
      if (spent_out) spent_out[b * out_cols + j] = X.spent;
    }
    if (!R.cascade) def[R.gamma] = true;
  }
}

}  // namespace

void solve(Problem& P, int64_t* tokens, int64_t cols, int64_t* num_accepted, bool* deferred,
           double* spent) {
  for (Request& R : P.reqs) {
    R.inv_t = R.t > 0.0 ? 1.0 / R.t : 1.0;
    R.inv_t_f = static_cast<float>(std::min<double>(R.inv_t, std::numeric_limits<float>::max()));
  }
  // spec's costs are all 0: with a budget it is spec still, and charges nothing (spent stays 0)
  P.budget = spent != nullptr && P.rule != kSpec;
  stage_targets(P);
  if (P.budget) stage_budget(P);
  stage_accept(P);
  stage_resample(P);
  stage_insert(P, tokens, cols, num_accepted, deferred, P.budget ? spent : nullptr);
}

}  // namespace verify_cpu
}  // namespace speccascade
