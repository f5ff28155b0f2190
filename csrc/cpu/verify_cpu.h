// The CPU verification's problem description: what the op glue (verify_cpu_ops.cpp) fills in
// from the tensors, and what the algorithm (verify_cpu.cpp) solves, stage by stage. The CUDA side
// has the same split: verify_cuda.cpp (torch glue) -> verify.h -> verify.cu (kernels).
//
// The glue fills only the fields marked "input"; everything else is the working state of the
// stages (targets, accept, resample, insert), owned by verify_cpu.cpp.
#pragma once

#include <cstdint>
#include <limits>
#include <vector>

#include "../keep_bound.h"

namespace speccascade {
namespace verify_cpu {

// rules.RULES, in order: the op's integer rule ids.
enum Rule : int64_t {
  kSpec, kDrafter, kChow, kChowLog, kDiff, kDiffLog, kOpt, kOptLog,
  kTokenV1, kTokenV2, kTokenV3, kLossy, kLossyStar, kBild, kNumRules
};
inline const char* const kRuleNames[kNumRules] = {
    "spec", "drafter", "chow", "chow_log", "diff", "diff_log", "opt", "opt_log",
    "token_v1", "token_v2", "token_v3", "lossy", "lossy_star", "bild"};

// ---- rows ----------------------------------------------------------------------------------------
enum class DType : uint8_t { kF32, kF16, kBF16 };

// One logit row [V], unit stride. The accessors are defined in verify_cpu.cpp, next to the block
// kernels they call (its only user).
struct Row {
  const void* ptr = nullptr;  // nullptr: no row (the drafter at the bonus position, bonus=verifier)
  DType dt = DType::kF32;
  KeepBound keep;  // top-k / top-p: what the scaled law keeps (everything by default)
  bool present() const { return ptr != nullptr; }
  // logit v, as fp64 of its fp32 value
  inline double at(int64_t v) const;
  // logits [lo, lo + n) as fp32: in place for fp32 rows, else converted into buf.
  inline const float* load(int64_t lo, int n, float* buf) const;
  // the same block for the scaled law: truncated tokens read as -inf (buf holds the result)
  inline const float* load_scaled(int64_t lo, int n, float* buf) const;
  inline bool kept(int64_t v) const;
};

// ---- per-row statistics (online softmax state) ---------------------------------------------------
struct RowStats {
  float m = -std::numeric_limits<float>::infinity();  // max logit (-inf: nothing finite seen yet)
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
  float masked_max = -std::numeric_limits<float>::infinity();  // max lq over lp = -inf
};

// ---- problem description -------------------------------------------------------------------------
// resample: which law the race draws from (the residual at j*, the position's law when that
// residual is all zero, the bonus law of a cascade, pT for bonus="verifier")
enum RaceKind : uint8_t { kRaceResidual, kRaceKept, kRaceBonus, kRaceVerifier };

// One position j of a request: draft row q (absent at the bonus position with bonus="verifier"),
// target row p, the draft token.
struct Position {
  Row q, p;            // input
  int64_t req = 0;     // input: its request's index
  int64_t j = 0;       // input: its index in the request (gamma: the bonus position)
  int64_t token = -1;  // input: the draft token at this position (-1 at the bonus position)
  // targets
  int q_flags = 0, p_flags = 0;
  bool need_cross = false;
  PosStats st;
  double q_lst = 0, p_lst = 0;  // log of the scaled sums (fp64)
  bool delta = false;
  double tv = 0.0;
  // token rules: v in A iff (double)l_v - m >= thr_a on q (v1) or p (v2/3)
  double thr_a = -std::numeric_limits<double>::infinity();
  double eta = 0.0;
  bool has_eta = false;
  double s = 0.0;  // lossy_star: 1 / beta
  bool has_s = false;
  double rm = 0.0, tot = 0.0;  // lossy: rejected mass and residual total at the bonus row
  bool has_lossy = false;
  bool has_stats = false;  // the targets statistics pass ran on this position (lazily, for some rules)
  bool has_tv = false;     // tv holds TV(qT, pT)
  // budget (only with Problem::budget): the cost TV(pi, pT) of the rule's law here, whether the
  // scan verifies the position exactly like spec instead, and what it charged
  double cost = 0.0;
  bool has_cost = false;
  bool exact = false;
  double spent = 0.0;
};

struct Request {
  int64_t gamma = 0;  // input: its number of drafts
  int64_t first = 0;  // input: index of its position 0 in the positions array
  double t = 1.0, alpha = 0.0;       // input: temperature (finite, >= 0) and the rule's alpha
  int64_t seed = 0, position = 0;    // input: the RNG's seed and position of its first draft
  bool cascade = true;               // input: bonus="cascade" (its position gamma has a q row)
  double budget = std::numeric_limits<double>::infinity();  // input: divergence it may spend
  double inv_t = 1.0;                // 1 / T (1 at T = 0)
  float inv_t_f = 1.0f;
  // accept
  int64_t j = 0;
  bool resolved = false;
  // resample
  RaceKind kind = kRaceResidual;
  int64_t race_pos = 0;
  uint64_t key = 0;
  float a0 = -std::numeric_limits<float>::infinity(), b0 = -std::numeric_limits<float>::infinity();
  double best_score = -std::numeric_limits<double>::infinity();
  int64_t best_idx = -1;
};

struct Problem {
  int64_t rule = 0;            // input: a Rule
  int64_t V = 0;               // input: vocabulary size (>= 1)
  std::vector<Request> reqs;   // input: the requests (B >= 1)
  std::vector<Position> pos;   // input: every request's gamma + 1 positions, request by request
  bool budget = false;         // set by solve: the budget stage runs (docs/semantics.md §9)
};

// Verifies the block: stages targets, budget, accept, resample and insert (see verify_cpu.cpp).
// Writes row b of the outputs: tokens[b * cols ...] (the accepted drafts, then the resampled /
// bonus token; the caller pre-fills -1 padding), num_accepted[b], deferred[b * cols ...] (the
// caller pre-fills False). spent: nullptr (no divergence budget: the budget stage does not run),
// or spent[b * cols ...], each position's charge against Request::budget (the caller pre-fills
// 0). Inputs are validated by the caller.
void solve(Problem& P, int64_t* tokens, int64_t cols, int64_t* num_accepted, bool* deferred,
           double* spent = nullptr);

}  // namespace verify_cpu
}  // namespace speccascade
