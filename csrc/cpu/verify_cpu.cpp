// Fused speculative-cascade verification on CPU: the "cpu" backend.
//
// Ops (registered with TORCH_LIBRARY_FRAGMENT, reachable as torch.ops.speccascade.* once
// speccascade_fast._C is imported):
//
//   verify_ragged(draft_logits [N, V], draft_tokens [N], target_logits [N + B, V],
//                 cu_num_draft_tokens [B + 1], bonus_draft_logits [B, V]?, seed [B], positions [B],
//                 temperature [B] f64, alpha [B] f64, rule int | str,
//                 draft_keep [N, 2]?, target_keep [N + B, 2]?, bonus_keep [B, 2]?,
//                 max_spec_len int = 0)
//       -> (tokens [B, W] int64, -1 padded; num_accepted [B] int64; deferred [B, W] bool, False
//           padded), W = max_gamma + 1, or max_spec_len + 1 when max_spec_len > 0 (vLLM's
//           argument: the output width no longer depends on cu's values, so the CUDA kernel
//           reads nothing on the host; here cu is still validated, and every gamma_b must be
//           <= max_spec_len; cu may then end before N: the rows after it are padding, as in
//           a fixed-size buffer that a CUDA graph replays)
//     Request b owns draft rows cu[b]:cu[b+1] and target rows cu[b]+b : cu[b+1]+b+1 (vLLM's
//     flattened layout). bonus_draft_logits given: bonus="cascade" (the drafter at the bonus
//     position); None: bonus="verifier" (the bonus token is drawn from pT).
//   verify_padded(draft_logits [B, G, V] (G = gamma: verifier bonus; gamma + 1: cascade bonus),
//                 draft_tokens [B, gamma], target_logits [B, gamma + 1, V], seed, positions,
//                 temperature, alpha, rule, draft_keep [B, G, 2]?, target_keep [B, gamma + 1, 2]?)
//       -> the same, [B, gamma + 1]
//     The padded layout of speccascade_fast.verify, read in place (any strides, unit stride in V).
//   *_keep: top-k / top-p as per-row keep bounds (tau, cut), float64 (speccascade_fast/
//     truncation.py): the scaled laws qT, pT keep {v : l_v > tau or (l_v == tau and v <= cut)}
//     only; the unscaled q1, p1 of the deferral statistics stay whole. A truncated row is read
//     as -inf outside its set wherever a scaled quantity is formed, and T = 1 no longer lets the
//     scaled sums reuse the unscaled ones.
//
// Semantics: exactly speccascade_fast/backends/reference.py (Algorithm 4 towards each rule's
// target, counter-based RNG of rng.py), stage by stage:
//
//   1. stats     one streaming pass per (position, chunk of V): for the draft row q and the target
//                row p the max, its argmax, sum exp(l - m) (T = 1), sum exp((l - m)/T), and, when
//                the rule needs them, sum e (l - m) (entropy) and sum e_q l_p (bild's cross
//                entropy). Online softmax: a block raising the running max rescales the sums once.
//                Chunks are a fixed 16384 logits (not "per thread"), so results do not depend on
//                the thread count; (position, chunk) tasks are shared by the calling thread and
//                helpers on ATen's inter-op pool (run_tasks). For spec, drafter, lossy,
//                lossy_star and token_v3, whose outputs do not need every position, a position's
//                stats are computed only when the accept loop reaches it: the rows after the
//                first rejection are never read (token_v3 reads their target rows' max only, for
//                the deferred flags).
//   2. targets   deferral decisions from the stats; a second pass over V only where a rule needs
//                one: TV(pT, qT) for opt/opt_log (skipped when the decision cannot depend on it,
//                TV in [0, 1]); eta = qT(outside A) for token rules, lazily, only at positions
//                the accept loop reaches with a draft outside A; lossy's bonus law; lossy_star's
//                beta, solved exactly (piecewise-linear equation, quickselect on breakpoints,
//                instead of the reference's 50 bisection passes), only at the one row that
//                resamples.
//   3. accept    per request, u_j = uniform(seed, position + j, ACCEPT) < accept_j(x) / qT_j(x),
//                fp64, stop at the first rejection.
//   4. resample  the exponential race argmax_v log w_v - log(-log u_v) over the single row that
//                needs it (the residual at j*, or the bonus row), split over V across threads. A
//                vectorised bound (a linear upper bound of log w from the logits plus a per-hash-
//                bucket bound of the Gumbel term) skips almost every token; the few survivors are
//                scored exactly in fp64 with the reference's formula, -log u evaluated in fp64
//                from the exact 53-bit u (so E = -log u is accurate for u near 1).
//   5. insert    tokens / num_accepted / deferred, as reference._deferred.
//
// Numerics: softmax sums use a fp32 polynomial exp with fp64 accumulation (relative error
// ~1e-7); scalar per-token quantities (qT(x), pT(x), acceptance ratios, candidate weights) are
// fp64 from those sums. Tokens therefore equal the reference's except at genuine floating-point
// near-ties (a uniform within ~1e-7 relative of an acceptance ratio, two race scores within ~1e-7,
// a deferral statistic within ~1e-7 of its threshold), and for logit spreads beyond fp32 exp's
// range (> 87 nats below the row max the fp32 terms are 0; they are < 1e-38 of the sum).
// fp64 logits are not handled here: the Python backend sends those calls to the reference.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <thread>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../keep_bound.h"
#include "../rng.h"
#include "../sample_common.h"

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#include "verify_kernels.h"
#pragma GCC pop_options

namespace speccascade {
namespace {

using namespace verify_kernels;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr float kInfF = std::numeric_limits<float>::infinity();
constexpr double kQFloor = 1e-10;      // rules.Q_FLOOR
constexpr int64_t kChunk = 16384;      // logits per task (fixed: results independent of threads)
constexpr int64_t kSerialWork = 1 << 16;  // below this many logits per phase, stay on one thread

// rules.RULES, in order: the op's integer rule ids.
enum Rule : int64_t {
  kSpec, kDrafter, kChow, kChowLog, kDiff, kDiffLog, kOpt, kOptLog,
  kTokenV1, kTokenV2, kTokenV3, kLossy, kLossyStar, kBild, kNumRules
};
const char* const kRuleNames[kNumRules] = {
    "spec", "drafter", "chow", "chow_log", "diff", "diff_log", "opt", "opt_log",
    "token_v1", "token_v2", "token_v3", "lossy", "lossy_star", "bild"};

bool is_prefix(int64_t r) { return (r >= kChow && r <= kOptLog) || r == kBild; }
bool is_token(int64_t r) { return r >= kTokenV1 && r <= kTokenV3; }

int64_t rule_id(const std::string& name) {
  for (int64_t i = 0; i < kNumRules; ++i)
    if (name == kRuleNames[i]) return i;
  TORCH_CHECK(false, "speccascade verify: unknown rule '", name, "'");
  return -1;
}

// ---- rows ----------------------------------------------------------------------------------------
enum class DType : uint8_t { kF32, kF16, kBF16 };

struct Row {
  const void* ptr = nullptr;  // nullptr: no row (the drafter at the bonus position, bonus=verifier)
  DType dt = DType::kF32;
  KeepBound keep;  // top-k / top-p: what the scaled law keeps (everything by default)
  bool present() const { return ptr != nullptr; }
  double at(int64_t v) const {
    switch (dt) {
      case DType::kF32: return static_cast<const float*>(ptr)[v];
      case DType::kF16: return static_cast<float>(static_cast<const c10::Half*>(ptr)[v]);
      default: return static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[v]);
    }
  }
  // logits [lo, lo + n) as fp32: in place for fp32 rows, else converted into buf.
  const float* load(int64_t lo, int n, float* buf) const {
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
  // the same block for the scaled law: truncated tokens read as -inf (buf holds the result)
  const float* load_scaled(int64_t lo, int n, float* buf) const {
    const float* x = load(lo, n, buf);
    if (!keep.trunc) return x;
    truncate_block(x, buf, n, lo, keep.tau, keep.cut);
    return buf;
  }
  bool kept(int64_t v) const { return keep.kept(static_cast<float>(at(v)), v); }
};

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default:
      TORCH_CHECK(false, "speccascade verify: ", name,
                  " must be float32, float16 or bfloat16 (use the reference backend for ",
                  t.scalar_type(), ")");
  }
  return DType::kF32;
}

// ---- per-row statistics (online softmax state) ---------------------------------------------------
struct RowStats {
  float m = -kInfF;  // max logit (-inf: nothing finite seen yet)
  int64_t arg = 0;   // lowest id of the max
  double s1 = 0.0;   // sum exp(l - m)
  double st = 0.0;   // sum exp((l - m) / T)
  double h = 0.0;    // sum exp(l - m) * (l - m)
};

struct PosStats {
  RowStats q, p;
  // bild, T > 0, over the tokens with lp > -inf: cross = sum exp(lq - mq) (lp - mp) and
  // cross_s = sum exp(lq - mq), with the current maxima mq, mp
  double cross = 0.0, cross_s = 0.0;
  float masked_max = -kInfF;  // max lq over lp = -inf
};

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

// ---- problem description -------------------------------------------------------------------------
enum PiMode : uint8_t { kPiQ, kPiP, kPiToken, kPiLossy, kPiLStar };
enum RaceKind : uint8_t { kRaceResidual, kRaceKept, kRaceBonus, kRaceVerifier };
enum NeedKind : uint8_t { kNeedStats, kNeedTV, kNeedEta, kNeedLossy, kNeedLStar };

struct Position {
  Row q, p;
  int64_t req = 0;
  int64_t j = 0;
  int64_t token = -1;  // the draft token at this position (-1 at the bonus position)
  int q_flags = 0, p_flags = 0;
  bool need_cross = false;
  PosStats st;
  // derived (fp64)
  double q_lst = 0, p_lst = 0;  // log of the scaled sums
  bool delta = false;
  double tv = 0.0;
  double thr_a = -kInf;  // token rules: v in A iff (double)l_v - m >= thr_a on q (v1) or p (v2/3)
  double eta = 0.0;
  bool has_eta = false;
  double s = 0.0;  // lossy_star: 1 / beta
  bool has_s = false;
  double rm = 0.0, tot = 0.0;  // lossy: rejected mass and residual total at the bonus row
  bool has_lossy = false;
  bool has_stats = false;  // stage 1 ran on this position (lazily, for some rules)
};

struct Request {
  int64_t gamma = 0;
  int64_t first = 0;  // index of its position 0 in the positions array
  double t = 1.0, alpha = 0.0;
  double inv_t = 1.0;
  float inv_t_f = 1.0f;
  int64_t seed = 0, position = 0;
  bool cascade = true;
  // accept
  int64_t j = 0;
  bool resolved = false;
  // resample
  RaceKind kind = kRaceResidual;
  int64_t race_pos = 0;
  uint64_t key = 0;
  float a0 = -kInfF, b0 = -kInfF;
  double best_score = -kInf;
  int64_t best_idx = -1;
};

struct Problem {
  int64_t rule = 0;
  int64_t V = 0;
  std::vector<Request> reqs;
  std::vector<Position> pos;
};

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

// ---- parallel helper -----------------------------------------------------------------------------
// Tasks are claimed from an atomic counter by the calling thread and by up to
// at::get_num_threads() - 1 helpers started on ATen's inter-op pool (at::launch). The caller waits
// only for tasks that were claimed, never for a helper to start: on a machine whose cores are
// shared, a helper that is not scheduled in time simply finds no work left. (An OpenMP region,
// at::parallel_for, ends with a barrier that waits for every team thread: with the other core
// busy that costs a scheduler time slice, ~4 ms, per region, far more than a block's work.)
// Results do not depend on which thread runs a task.
struct TaskQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;

  void work() {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;  // late helpers return here without touching fn
      (*fn)(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

template <class F>
void run_tasks(int64_t n, int64_t total_work, const F& f) {
  if (n <= 0) return;
  const int64_t threads = at::get_num_threads();
  if (total_work < kSerialWork || n == 1 || threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  const std::function<void(int64_t)> fn = [&f](int64_t i) { f(i); };
  auto queue = std::make_shared<TaskQueue>();
  queue->n = n;
  queue->fn = &fn;
  const int64_t helpers = std::min(threads, n) - 1;
  for (int64_t h = 0; h < helpers; ++h) at::launch([queue] { queue->work(); });
  queue->work();
  while (queue->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
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

// ---- stage 1: stats -------------------------------------------------------------------------------
// max_only: just the target row's max and argmax (token_v3's deferred flags at positions the
// accept loop never reached).
void stats_chunk(const Position& X, const Request& R, int64_t lo, int64_t hi, bool max_only,
                 PosStats& out) {
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

// ---- stage 2: second-pass sums ---------------------------------------------------------------------
struct Need {
  int64_t pos;
  NeedKind kind;
};

void sum_chunk(const Problem& P, const Need& nd, int64_t lo, int64_t hi, double* out) {
  const Position& X = P.pos[nd.pos];
  const Request& R = P.reqs[X.req];
  alignas(64) float bq[kBlock], bp[kBlock], w[kBlock], w2[kBlock];
  const float mq = X.st.q.m, mp = X.st.p.m;
  const float rq = static_cast<float>(1.0 / X.st.q.st), rp = static_cast<float>(1.0 / X.st.p.st);
  const bool token_on_q = P.rule == kTokenV1;
  // qT reads the (truncated) scaled blocks; A's membership (eta) the raw logits of its row
  const Row& ra = token_on_q ? X.q : X.p;
  const bool a_shares_q = nd.kind == kNeedEta && token_on_q && !X.q.keep.trunc;
  for (int64_t b = lo; b < hi; b += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, hi - b));
    const float* xq = X.q.load_scaled(b, n, bq);
    const float* xp = a_shares_q ? xq
                      : nd.kind == kNeedEta ? ra.load(b, n, bp) : X.p.load_scaled(b, n, bp);
    switch (nd.kind) {
      case kNeedTV:
        out[0] += tv_block(xq, xp, n, mp, R.inv_t_f, rp,
                           static_cast<float>(static_cast<double>(mq) - mp),
                           static_cast<float>(X.q_lst - X.p_lst), w);
        break;
      case kNeedEta:
        out[0] += eta_block(xp, token_on_q ? mq : mp, X.thr_a, xq, n, mq, R.inv_t_f, rq, w);
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
double solve_lossy_star(const Problem& P, const Position& X, const Request& R) {
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
  if (!(D > 0.0)) return 0.0;
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
  return std::min(s, c);
}

// ---- stage 2: targets (deferral decisions and token-rule sets) -------------------------------------
// Token-rule threshold of A (see in_a), from the position's statistics.
void derive(const Problem& P, Position& X) {
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

// Stage 1 for the positions listed: (position, chunk) tasks, merged in chunk order.
void run_stats(Problem& P, const std::vector<int64_t>& which, bool max_only = false) {
  if (which.empty()) return;
  const int64_t V = P.V, nc = num_chunks(V), n = static_cast<int64_t>(which.size());
  std::vector<PosStats> partial(static_cast<size_t>(n * nc));
  run_tasks(n * nc, n * V * (max_only ? 1 : 2), [&](int64_t t) {
    const Position& X = P.pos[which[t / nc]];
    const int64_t lo = (t % nc) * kChunk, hi = std::min(V, lo + kChunk);
    stats_chunk(X, P.reqs[X.req], lo, hi, max_only, partial[t]);
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
      derive(P, X);
    }
  }
}

// delta for prefix rules; returns whether TV is still needed (opt/opt_log, T > 0, ambiguous).
bool decide(const Problem& P, Position& X, bool tv_known) {
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
      if (R.t == 0.0 && !tv_known) X.tv = q.arg != p.arg ? 1.0 : 0.0, tv_known = true;
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

// Run second-pass sums for every need (kTV/kEta/kLossy chunked over V, kLStar one task per row).
void run_needs(Problem& P, const std::vector<Need>& needs) {
  if (needs.empty()) return;
  const int64_t nc = num_chunks(P.V);
  std::vector<Need> sums, lstar;
  std::vector<int64_t> stats;
  for (const Need& n : needs) {
    if (n.kind == kNeedStats) stats.push_back(n.pos);
    else (n.kind == kNeedLStar ? lstar : sums).push_back(n);
  }
  run_stats(P, stats);
  const int64_t ntasks = static_cast<int64_t>(sums.size()) * nc + static_cast<int64_t>(lstar.size());
  std::vector<double> partial(static_cast<size_t>(sums.size() * nc * 2), 0.0);
  std::vector<double> svals(lstar.size(), 0.0);
  run_tasks(ntasks, ntasks * std::min<int64_t>(P.V, kChunk) * 2, [&](int64_t t) {
    const int64_t ns = static_cast<int64_t>(sums.size()) * nc;
    if (t < ns) {
      const Need& nd = sums[t / nc];
      const int64_t lo = (t % nc) * kChunk, hi = std::min(P.V, lo + kChunk);
      sum_chunk(P, nd, lo, hi, &partial[2 * t]);
    } else {
      const Need& nd = lstar[t - ns];
      const Position& X = P.pos[nd.pos];
      svals[t - ns] = solve_lossy_star(P, X, P.reqs[X.req]);
    }
  });
  for (size_t i = 0; i < sums.size(); ++i) {
    double a = 0.0, b = 0.0;
    for (int64_t c = 0; c < nc; ++c) a += partial[2 * (i * nc + c)], b += partial[2 * (i * nc + c) + 1];
    Position& X = P.pos[sums[i].pos];
    switch (sums[i].kind) {
      case kNeedTV: X.tv = a; break;
      case kNeedEta: X.eta = a, X.has_eta = true; break;
      case kNeedLossy: X.rm = a, X.tot = b, X.has_lossy = true; break;
      default: break;
    }
  }
  for (size_t i = 0; i < lstar.size(); ++i) {
    Position& X = P.pos[lstar[i].pos];
    X.s = svals[i], X.has_s = true;
  }
}

// ---- stage 3: accept -------------------------------------------------------------------------------
// Advance request R through its drafts as far as the known quantities allow. Returns a need when
// blocked (eta or s at the current position), nothing when resolved.
std::optional<Need> advance(Problem& P, Request& R) {
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

// ---- stage 4: resample -------------------------------------------------------------------------------
// Choose the row and weights; return the need that must be met first, if any.
std::optional<Need> plan_race(Problem& P, Request& R) {
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
void bound_constants(const Problem& P, Request& R) {
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
Best race_seed(const Problem& P, const Request& R) {
  const Position& X = P.pos[R.race_pos];
  Best best;
  for (int64_t v : {X.q.present() ? X.st.q.arg : X.st.p.arg, X.st.p.arg})
    best.consider(exact_score(P, R, v), v);
  return best;
}

Best race_chunk(const Problem& P, const Request& R, const Best& seed, int64_t lo, int64_t hi) {
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

void run_races(Problem& P, std::vector<int64_t>& which) {
  if (which.empty()) return;
  const int64_t nc = num_chunks(P.V);
  std::vector<Best> partial(which.size() * nc), seeds(which.size());
  for (size_t i = 0; i < which.size(); ++i) seeds[i] = race_seed(P, P.reqs[which[i]]);
  const int64_t n = static_cast<int64_t>(which.size()) * nc;
  run_tasks(n, n * std::min<int64_t>(P.V, kChunk), [&](int64_t t) {
    const Request& R = P.reqs[which[t / nc]];
    const int64_t lo = (t % nc) * kChunk, hi = std::min(P.V, lo + kChunk);
    partial[t] = race_chunk(P, R, seeds[t / nc], lo, hi);
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
      bound_constants(P, R);
      again.push_back(which[i]);
      continue;
    }
    R.best_score = best.score;
    R.best_idx = best.idx < 0 ? 0 : best.idx;  // all weights 0: torch.argmax of all -inf is 0
  }
  run_races(P, again);
}

// ---- the whole block ---------------------------------------------------------------------------
void flags_for(const Problem& P, Position& X) {
  const Request& R = P.reqs[X.req];
  const int64_t r = P.rule;
  const bool s1_q = (r >= kChow && r <= kOptLog) || r == kBild || r == kTokenV1;
  const bool s1_p = (r >= kDiff && r <= kOptLog) || r == kBild || is_token(r);
  const bool h_q = r == kChowLog || r == kDiffLog || r == kOptLog;
  const bool h_p = r == kDiffLog || r == kOptLog;
  const bool scaled = R.t > 0.0;
  const bool unit_q = R.t == 1.0 && !X.q.keep.trunc;  // the scaled sum is the unscaled one (derive)
  const bool unit = R.t == 1.0 && !X.p.keep.trunc;
  if (X.q.present()) {
    X.q_flags = (s1_q || unit_q ? kS1 : 0) | (h_q ? kH : 0) | (scaled && !unit_q ? kST : 0);
    X.p_flags = (s1_p || unit ? kS1 : 0) | (h_p ? kH : 0) | (scaled && !unit ? kST : 0);
    X.need_cross = r == kBild && scaled;
    if (X.need_cross) X.q_flags |= kS1;
    if (r == kDrafter) X.p_flags = -1;  // the target row is never needed
  } else {  // bonus=verifier bonus position: pT only
    X.p_flags = unit ? kS1 : (scaled ? kST : 0);
  }
  if (X.q_flags & kH) X.q_flags |= kS1;
  if (X.p_flags > 0 && (X.p_flags & kH)) X.p_flags |= kS1;
}

void solve(Problem& P, int64_t* tokens_out, int64_t out_cols, int64_t* nacc_out,
           bool* deferred_out) {
  const int64_t npos = static_cast<int64_t>(P.pos.size());
  for (Position& X : P.pos) flags_for(P, X);

  // 1. stats. Rules whose deferred flags do not need every position (spec, drafter, lossy,
  // lossy_star, token_v3) compute them lazily, as the accept loop reaches each position: the
  // rows after the first rejection are never read.
  const bool lazy = P.rule == kSpec || P.rule == kDrafter || P.rule == kLossy ||
                    P.rule == kLossyStar || P.rule == kTokenV3;
  {
    std::vector<int64_t> first;
    for (int64_t i = 0; i < npos; ++i)
      if (!lazy || P.pos[i].j == 0) first.push_back(i);
    run_stats(P, first);
  }

  // 2. targets: deferral decisions, TV where it decides (prefix rules: every position has stats)
  if (is_prefix(P.rule)) {
    std::vector<Need> tv;
    for (int64_t i = 0; i < npos; ++i)
      if (P.pos[i].q.present() && decide(P, P.pos[i], false)) tv.push_back({i, kNeedTV});
    run_needs(P, tv);
    for (const Need& n : tv) decide(P, P.pos[n.pos], true);
  }

  // 3. accept, in rounds: each round runs the second passes every blocked request asked for
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  for (;;) {
    std::vector<Need> needs;
    for (Request& R : P.reqs) {
      if (R.resolved) continue;
      if (auto nd = advance(P, R)) needs.push_back(*nd);
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
    run_needs(P, needs);
  }

  // 4. resample (rounds again: the row's stats, then eta / beta / lossy's law where needed)
  {
    for (;;) {
      std::vector<Need> needs;
      for (Request& R : P.reqs)
        if (auto nd = plan_race(P, R)) needs.push_back(*nd);
      if (needs.empty()) break;
      run_needs(P, needs);
    }
    std::vector<int64_t> which;
    for (int64_t b = 0; b < static_cast<int64_t>(P.reqs.size()); ++b) {
      bound_constants(P, P.reqs[b]);
      which.push_back(b);
    }
    run_races(P, which);
  }

  // 5. insert: tokens, num_accepted, deferred (reference._deferred)
  if (P.rule == kTokenV3) {  // whether each draft is in A needs the target row's max only
    std::vector<int64_t> unread;
    for (int64_t i = 0; i < npos; ++i) {
      Position& X = P.pos[i];
      if (!X.has_stats && X.token >= 0) {
        unread.push_back(i);
        X.thr_a = 1.0 - P.reqs[X.req].alpha <= 0.0 ? -kInf : std::log(1.0 - P.reqs[X.req].alpha);
      }
    }
    run_stats(P, unread, /*max_only=*/true);
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
      def[j] = d;
    }
    if (!R.cascade) def[R.gamma] = true;
  }
}

// ---- op entry points ---------------------------------------------------------------------------
at::Tensor unit_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void fill_request(Request& R, int64_t b, const at::Tensor& seed, const at::Tensor& positions,
                  const at::Tensor& temperature, const at::Tensor& alpha) {
  R.seed = seed.data_ptr<int64_t>()[b];
  R.position = positions.data_ptr<int64_t>()[b];
  R.t = temperature.data_ptr<double>()[b];
  R.alpha = alpha.data_ptr<double>()[b];
  TORCH_CHECK(std::isfinite(R.t) && R.t >= 0.0,
              "speccascade verify: temperature must be finite and >= 0, got ", R.t);
  R.inv_t = R.t > 0.0 ? 1.0 / R.t : 1.0;
  R.inv_t_f = static_cast<float>(std::min<double>(R.inv_t, std::numeric_limits<float>::max()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> make_outputs(int64_t B, int64_t cols) {
  auto opts = at::TensorOptions().device(at::kCPU);
  return {at::full({B, cols}, -1, opts.dtype(at::kLong)), at::zeros({B}, opts.dtype(at::kLong)),
          at::zeros({B, cols}, opts.dtype(at::kBool))};
}

void check_per_request(const at::Tensor& seed, const at::Tensor& positions,
                       const at::Tensor& temperature, const at::Tensor& alpha, int64_t B,
                       int64_t rule) {
  TORCH_CHECK(rule >= 0 && rule < kNumRules, "speccascade verify: rule id ", rule,
              " out of range [0, ", kNumRules, ")");
  for (const auto& [t, name, dt] :
       {std::tuple<const at::Tensor&, const char*, at::ScalarType>{seed, "seed", at::kLong},
        {positions, "positions", at::kLong}, {temperature, "temperature", at::kDouble},
        {alpha, "alpha", at::kDouble}}) {
    TORCH_CHECK(t.device().is_cpu() && t.dim() == 1 && t.size(0) == B && t.scalar_type() == dt,
                "speccascade verify: ", name, " must be a CPU ", dt, " tensor of shape [", B,
                "], got ", t.scalar_type(), " ", t.sizes());
  }
  if (rule == kLossy || rule == kLossyStar) {
    const double* a = alpha.data_ptr<double>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(a[b] < 1.0, "speccascade verify: alpha must be < 1 for ", kRuleNames[rule]);
  }
}

// Top-k / top-p keep bounds (speccascade_fast/truncation.py): float64 [rows..., 2] = (tau, cut)
// per logit row, or none. Returns a pointer to rows of 2 doubles (nullptr: no truncation).
const double* keep_rows(const std::optional<at::Tensor>& keep, at::IntArrayRef rows,
                        const char* name) {
  if (!keep.has_value()) return nullptr;
  const at::Tensor& k = *keep;
  std::vector<int64_t> want(rows.begin(), rows.end());
  want.push_back(2);
  TORCH_CHECK(k.device().is_cpu() && k.scalar_type() == at::kDouble && k.is_contiguous() &&
                  k.sizes() == at::IntArrayRef(want),
              "speccascade verify: ", name, " must be a contiguous CPU float64 tensor of shape ",
              at::IntArrayRef(want), ", got ", k.scalar_type(), " ", k.sizes());
  return k.data_ptr<double>();
}

void set_keep(Row& r, const double* k, int64_t V) {
  if (k == nullptr) return;
  TORCH_CHECK(!std::isnan(k[0]) && k[1] >= 0.0, "speccascade verify: bad keep bound (", k[0],
              ", ", k[1], ")");
  r.keep = KeepBound::from(k, V);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_ragged_cpu(
    const at::Tensor& draft_logits_in, const at::Tensor& draft_tokens_in,
    const at::Tensor& target_logits_in, const at::Tensor& cu_in,
    const std::optional<at::Tensor>& bonus_in, const at::Tensor& seed_in,
    const at::Tensor& positions_in, const at::Tensor& temperature_in, const at::Tensor& alpha_in,
    int64_t rule, const std::optional<at::Tensor>& draft_keep,
    const std::optional<at::Tensor>& target_keep, const std::optional<at::Tensor>& bonus_keep,
    int64_t max_spec_len) {
  TORCH_CHECK(draft_logits_in.dim() == 2 && target_logits_in.dim() == 2,
              "verify_ragged: draft_logits [N, V] and target_logits [N + B, V] must be 2-D");
  TORCH_CHECK(max_spec_len >= 0, "verify_ragged: max_spec_len must be >= 0 (0: from "
              "cu_num_draft_tokens), got ", max_spec_len);
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.size(0) >= 2 && cu_in.scalar_type() == at::kLong,
              "verify_ragged: cu_num_draft_tokens must be int64 [B + 1] with B >= 1");
  const at::Tensor cu = cu_in.contiguous();
  const at::Tensor tok = draft_tokens_in.contiguous();
  const at::Tensor dl = unit_stride(draft_logits_in), tl = unit_stride(target_logits_in);
  const at::Tensor seed = seed_in.contiguous(), positions = positions_in.contiguous();
  const at::Tensor temperature = temperature_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t B = cu.size(0) - 1;
  const int64_t N = dl.size(0), V = tl.size(1);
  TORCH_CHECK(dl.size(1) == V, "verify_ragged: vocabulary mismatch (", dl.size(1), " vs ", V, ")");
  TORCH_CHECK(V >= 1, "verify_ragged: empty vocabulary");
  TORCH_CHECK(tl.size(0) == N + B, "verify_ragged: target_logits must have N + B = ", N + B,
              " rows, got ", tl.size(0));
  TORCH_CHECK(tok.dim() == 1 && tok.size(0) == N && tok.scalar_type() == at::kLong,
              "verify_ragged: draft_tokens must be int64 [N] = [", N, "]");
  check_per_request(seed, positions, temperature, alpha, B, rule);
  const int64_t* c = cu.data_ptr<int64_t>();
  // with max_spec_len, rows past cu[B] (drafts) and cu[B] + B (targets) are padding, never read
  TORCH_CHECK(c[0] == 0 && (c[B] == N || (max_spec_len > 0 && c[B] <= N)),
              "verify_ragged: cu_num_draft_tokens must start at 0 and end at N (at most N with "
              "max_spec_len > 0)");
  int64_t max_gamma = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(c[b + 1] - c[b] >= 1, "verify_ragged: every request needs gamma >= 1 drafts");
    max_gamma = std::max(max_gamma, c[b + 1] - c[b]);
  }
  TORCH_CHECK(max_spec_len == 0 || max_gamma <= max_spec_len, "verify_ragged: a request has ",
              max_gamma, " drafts, more than max_spec_len = ", max_spec_len);
  const int64_t width = (max_spec_len > 0 ? max_spec_len : max_gamma) + 1;
  at::Tensor bonus;
  if (bonus_in.has_value()) {
    bonus = unit_stride(*bonus_in);
    TORCH_CHECK(bonus.dim() == 2 && bonus.size(0) == B && bonus.size(1) == V,
                "verify_ragged: bonus_draft_logits must be [B, V] = [", B, ", ", V, "]");
  }
  const DType dq = dtype_of(dl, "draft_logits"), dp = dtype_of(tl, "target_logits");
  const DType db = bonus.defined() ? dtype_of(bonus, "bonus_draft_logits") : dq;
  const int64_t* tp = tok.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(tp[i] >= 0 && tp[i] < V, "verify_ragged: draft token ", tp[i], " outside [0, ", V, ")");

  Problem P;
  P.rule = rule;
  P.V = V;
  P.reqs.resize(B);
  const char* qbase = static_cast<const char*>(dl.data_ptr());
  const char* pbase = static_cast<const char*>(tl.data_ptr());
  const int64_t qs = dl.stride(0) * dl.element_size(), ps = tl.stride(0) * tl.element_size();
  const double* kq = keep_rows(draft_keep, {N}, "draft_keep");
  const double* kp = keep_rows(target_keep, {N + B}, "target_keep");
  const double* kb = bonus.defined() ? keep_rows(bonus_keep, {B}, "bonus_keep") : nullptr;
  TORCH_CHECK(bonus.defined() || !bonus_keep.has_value(),
              "verify_ragged: bonus_keep needs bonus_draft_logits");
  for (int64_t b = 0; b < B; ++b) {
    Request& R = P.reqs[b];
    fill_request(R, b, seed, positions, temperature, alpha);
    R.gamma = c[b + 1] - c[b];
    R.cascade = bonus.defined();
    R.first = static_cast<int64_t>(P.pos.size());
    for (int64_t j = 0; j <= R.gamma; ++j) {
      Position X;
      X.req = b;
      X.j = j;
      if (j < R.gamma) {
        X.q = Row{qbase + (c[b] + j) * qs, dq};
        X.token = tp[c[b] + j];
        if (kq) set_keep(X.q, kq + 2 * (c[b] + j), V);
      } else if (bonus.defined()) {
        X.q = Row{static_cast<const char*>(bonus.data_ptr()) +
                      b * bonus.stride(0) * bonus.element_size(), db};
        if (kb) set_keep(X.q, kb + 2 * b, V);
      }
      X.p = Row{pbase + (c[b] + b + j) * ps, dp};
      if (kp) set_keep(X.p, kp + 2 * (c[b] + b + j), V);
      P.pos.push_back(X);
    }
  }
  auto [tokens, nacc, deferred] = make_outputs(B, width);
  solve(P, tokens.data_ptr<int64_t>(), width, nacc.data_ptr<int64_t>(),
        deferred.data_ptr<bool>());
  return {tokens, nacc, deferred};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_padded_cpu(
    const at::Tensor& draft_logits_in, const at::Tensor& draft_tokens_in,
    const at::Tensor& target_logits_in, const at::Tensor& seed_in, const at::Tensor& positions_in,
    const at::Tensor& temperature_in, const at::Tensor& alpha_in, int64_t rule,
    const std::optional<at::Tensor>& draft_keep, const std::optional<at::Tensor>& target_keep) {
  TORCH_CHECK(draft_logits_in.dim() == 3 && target_logits_in.dim() == 3 && draft_tokens_in.dim() == 2,
              "verify_padded: draft_logits [B, G, V], draft_tokens [B, gamma], target_logits "
              "[B, gamma + 1, V]");
  const at::Tensor dl = unit_stride(draft_logits_in), tl = unit_stride(target_logits_in);
  const at::Tensor tok = draft_tokens_in.to(at::kLong);
  const at::Tensor seed = seed_in.contiguous(), positions = positions_in.contiguous();
  const at::Tensor temperature = temperature_in.contiguous(), alpha = alpha_in.contiguous();
  const int64_t B = tok.size(0), gamma = tok.size(1), V = tl.size(2);
  TORCH_CHECK(B >= 1 && gamma >= 1, "verify_padded: need B >= 1 and gamma >= 1");
  TORCH_CHECK(V >= 1 && dl.size(2) == V, "verify_padded: vocabulary mismatch");
  TORCH_CHECK(tl.size(0) == B && tl.size(1) == gamma + 1, "verify_padded: target_logits must be [",
              B, ", ", gamma + 1, ", V]");
  TORCH_CHECK(dl.size(0) == B && (dl.size(1) == gamma || dl.size(1) == gamma + 1),
              "verify_padded: draft_logits must be [B, gamma or gamma + 1, V]");
  check_per_request(seed, positions, temperature, alpha, B, rule);
  const DType dq = dtype_of(dl, "draft_logits"), dp = dtype_of(tl, "target_logits");
  const bool cascade = dl.size(1) == gamma + 1;
  const int64_t* tp = tok.data_ptr<int64_t>();
  const int64_t ts0 = tok.stride(0), ts1 = tok.stride(1);
  const char* qbase = static_cast<const char*>(dl.data_ptr());
  const char* pbase = static_cast<const char*>(tl.data_ptr());
  const int64_t qs0 = dl.stride(0) * dl.element_size(), qs1 = dl.stride(1) * dl.element_size();
  const int64_t ps0 = tl.stride(0) * tl.element_size(), ps1 = tl.stride(1) * tl.element_size();
  const double* kq = keep_rows(draft_keep, {B, dl.size(1)}, "draft_keep");
  const double* kp = keep_rows(target_keep, {B, gamma + 1}, "target_keep");

  Problem P;
  P.rule = rule;
  P.V = V;
  P.reqs.resize(B);
  P.pos.reserve(static_cast<size_t>(B * (gamma + 1)));
  for (int64_t b = 0; b < B; ++b) {
    Request& R = P.reqs[b];
    fill_request(R, b, seed, positions, temperature, alpha);
    R.gamma = gamma;
    R.cascade = cascade;
    R.first = static_cast<int64_t>(P.pos.size());
    for (int64_t j = 0; j <= gamma; ++j) {
      Position X;
      X.req = b;
      X.j = j;
      if (j < gamma || cascade) {
        X.q = Row{qbase + b * qs0 + j * qs1, dq};
        if (kq) set_keep(X.q, kq + 2 * (b * dl.size(1) + j), V);
      }
      if (j < gamma) {
        X.token = tp[b * ts0 + j * ts1];
        TORCH_CHECK(X.token >= 0 && X.token < V, "verify_padded: draft token ", X.token,
                    " outside [0, ", V, ")");
      }
      X.p = Row{pbase + b * ps0 + j * ps1, dp};
      if (kp) set_keep(X.p, kp + 2 * (b * (gamma + 1) + j), V);
      P.pos.push_back(X);
    }
  }
  auto [tokens, nacc, deferred] = make_outputs(B, gamma + 1);
  solve(P, tokens.data_ptr<int64_t>(), gamma + 1, nacc.data_ptr<int64_t>(),
        deferred.data_ptr<bool>());
  return {tokens, nacc, deferred};
}

// The .name overloads, for every device (CompositeImplicitAutograd): the rule's id, then the
// integer overload through the dispatcher, which picks the CPU or the CUDA kernel.
using Out3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptT = std::optional<at::Tensor>;

Out3 verify_ragged_named(const at::Tensor& d, const at::Tensor& x, const at::Tensor& t,
                         const at::Tensor& cu, const OptT& bonus, const at::Tensor& seed,
                         const at::Tensor& positions, const at::Tensor& temperature,
                         const at::Tensor& alpha, c10::string_view rule, const OptT& draft_keep,
                         const OptT& target_keep, const OptT& bonus_keep, int64_t max_spec_len) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("speccascade::verify_ragged", "").typed<
          Out3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
               const OptT&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
               const at::Tensor&, int64_t, const OptT&, const OptT&, const OptT&, int64_t)>();
  return op.call(d, x, t, cu, bonus, seed, positions, temperature, alpha,
                 rule_id(std::string(rule)), draft_keep, target_keep, bonus_keep, max_spec_len);
}

Out3 verify_padded_named(const at::Tensor& d, const at::Tensor& x, const at::Tensor& t,
                         const at::Tensor& seed, const at::Tensor& positions,
                         const at::Tensor& temperature, const at::Tensor& alpha,
                         c10::string_view rule, const OptT& draft_keep, const OptT& target_keep) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("speccascade::verify_padded", "").typed<
          Out3(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
               const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const OptT&,
               const OptT&)>();
  return op.call(d, x, t, seed, positions, temperature, alpha, rule_id(std::string(rule)),
                 draft_keep, target_keep);
}

}  // namespace
}  // namespace speccascade

TORCH_LIBRARY_FRAGMENT(speccascade, m) {
  m.def(
      "verify_ragged(Tensor draft_logits, Tensor draft_tokens, Tensor target_logits, "
      "Tensor cu_num_draft_tokens, Tensor? bonus_draft_logits, Tensor seed, Tensor positions, "
      "Tensor temperature, Tensor alpha, int rule, Tensor? draft_keep=None, "
      "Tensor? target_keep=None, Tensor? bonus_keep=None, int max_spec_len=0) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "verify_ragged.name(Tensor draft_logits, Tensor draft_tokens, Tensor target_logits, "
      "Tensor cu_num_draft_tokens, Tensor? bonus_draft_logits, Tensor seed, Tensor positions, "
      "Tensor temperature, Tensor alpha, str rule, Tensor? draft_keep=None, "
      "Tensor? target_keep=None, Tensor? bonus_keep=None, int max_spec_len=0) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "verify_padded(Tensor draft_logits, Tensor draft_tokens, Tensor target_logits, "
      "Tensor seed, Tensor positions, Tensor temperature, Tensor alpha, int rule, "
      "Tensor? draft_keep=None, Tensor? target_keep=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "verify_padded.name(Tensor draft_logits, Tensor draft_tokens, Tensor target_logits, "
      "Tensor seed, Tensor positions, Tensor temperature, Tensor alpha, str rule, "
      "Tensor? draft_keep=None, Tensor? target_keep=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(speccascade, CPU, m) {
  m.impl("verify_ragged", &speccascade::verify_ragged_cpu);
  m.impl("verify_padded", &speccascade::verify_padded_cpu);
}

TORCH_LIBRARY_IMPL(speccascade, CompositeImplicitAutograd, m) {
  m.impl("verify_ragged.name", &speccascade::verify_ragged_named);
  m.impl("verify_padded.name", &speccascade::verify_padded_named);
}
