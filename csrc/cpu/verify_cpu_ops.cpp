// The torch ops of the fused CPU verification (the "cpu" backend): schema registration, argument
// checks, and the plumbing from tensors to the problem description (verify_cpu.h) that the
// algorithm (verify_cpu.cpp) solves.
//
// Ops (registered with TORCH_LIBRARY_FRAGMENT, reachable as torch.ops.speccascade.* once
// speccascade_fast._C is imported; the CUDA kernels of the same ops are registered by
// csrc/cuda/verify_cuda.cpp):
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
//   verify_padded.budget(the same arguments, *, budget [B] f64)
//       -> (tokens, num_accepted, deferred, spent [B, gamma + 1] f64)
//     With a divergence budget per request (docs/semantics.md §9, >= 0, inf: unlimited): a
//     position whose cost TV(pi, pT) would take the block's charges past it is verified exactly
//     like spec; spent holds each position's charge (0 at exact positions and, with
//     bonus="verifier", at the bonus). A separate overload, so that verify_padded (and the
//     kernels of other devices registered for it) is unchanged: without a budget nothing of it
//     runs.
//   *_keep: top-k / top-p as per-row keep bounds (tau, cut), float64 (speccascade_fast/
//     truncation.py): the scaled laws qT, pT keep {v : l_v > tau or (l_v == tau and v <= cut)}
//     only; the unscaled q1, p1 of the deferral statistics stay whole. A truncated row is read
//     as -inf outside its set wherever a scaled quantity is formed, and T = 1 no longer lets the
//     scaled sums reuse the unscaled ones.
//   The .name overloads take the rule by name (str) on every device (CompositeImplicitAutograd)
//   and call the integer overload through the dispatcher.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../keep_bound.h"
#include "verify_cpu.h"

namespace speccascade {
namespace {

using verify_cpu::DType;
using verify_cpu::Position;
using verify_cpu::Problem;
using verify_cpu::Request;
using verify_cpu::Row;
using verify_cpu::kNumRules;
using verify_cpu::kRuleNames;

int64_t rule_id(const std::string& name) {
  for (int64_t i = 0; i < kNumRules; ++i)
    if (name == kRuleNames[i]) return i;
  TORCH_CHECK(false, "speccascade verify: unknown rule '", name, "'");
  return -1;
}

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

at::Tensor unit_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void fill_request(Request& R, int64_t b, const at::Tensor& seed, const at::Tensor& positions,
                  const at::Tensor& temperature, const at::Tensor& alpha) {
  R.seed = seed.data_ptr<int64_t>()[b];
  R.position = positions.data_ptr<int64_t>()[b];
  R.t = temperature.data_ptr<double>()[b];
  R.alpha = alpha.data_ptr<double>()[b];
  TORCH_CHECK(std::isfinite(R.t) && R.t >= 0.0,
              "speccascade verify: temperature must be finite and >= 0, got ", R.t);
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
  if (rule == verify_cpu::kLossy || rule == verify_cpu::kLossyStar) {
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
  verify_cpu::solve(P, tokens.data_ptr<int64_t>(), width, nacc.data_ptr<int64_t>(),
        deferred.data_ptr<bool>());
  return {tokens, nacc, deferred};
}

// verify_padded, and its .budget overload when budget_in is given (then spent is the fourth
// output; undefined otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_padded_impl(
    const at::Tensor& draft_logits_in, const at::Tensor& draft_tokens_in,
    const at::Tensor& target_logits_in, const at::Tensor& seed_in, const at::Tensor& positions_in,
    const at::Tensor& temperature_in, const at::Tensor& alpha_in, int64_t rule,
    const std::optional<at::Tensor>& draft_keep, const std::optional<at::Tensor>& target_keep,
    const at::Tensor* budget_in) {
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
  const double* budget = nullptr;
  at::Tensor budget_t;
  if (budget_in != nullptr) {
    budget_t = budget_in->contiguous();
    TORCH_CHECK(budget_t.device().is_cpu() && budget_t.dim() == 1 && budget_t.size(0) == B &&
                    budget_t.scalar_type() == at::kDouble,
                "verify_padded: budget must be a CPU float64 tensor of shape [", B, "], got ",
                budget_t.scalar_type(), " ", budget_t.sizes());
    budget = budget_t.data_ptr<double>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(budget[b] >= 0.0, "verify_padded: budget must be >= 0 (inf: unlimited), got ",
                  budget[b]);
  }

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
    if (budget) R.budget = budget[b];
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
  at::Tensor spent;
  if (budget) spent = at::zeros({B, gamma + 1}, at::TensorOptions().dtype(at::kDouble));
  verify_cpu::solve(P, tokens.data_ptr<int64_t>(), gamma + 1, nacc.data_ptr<int64_t>(),
        deferred.data_ptr<bool>(), budget ? spent.data_ptr<double>() : nullptr);
  return {tokens, nacc, deferred, spent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_padded_cpu(
    const at::Tensor& draft_logits, const at::Tensor& draft_tokens,
    const at::Tensor& target_logits, const at::Tensor& seed, const at::Tensor& positions,
    const at::Tensor& temperature, const at::Tensor& alpha, int64_t rule,
    const std::optional<at::Tensor>& draft_keep, const std::optional<at::Tensor>& target_keep) {
  auto [tokens, nacc, deferred, spent] =
      verify_padded_impl(draft_logits, draft_tokens, target_logits, seed, positions, temperature,
                         alpha, rule, draft_keep, target_keep, nullptr);
  return {tokens, nacc, deferred};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_padded_budget_cpu(
    const at::Tensor& draft_logits, const at::Tensor& draft_tokens,
    const at::Tensor& target_logits, const at::Tensor& seed, const at::Tensor& positions,
    const at::Tensor& temperature, const at::Tensor& alpha, int64_t rule,
    const std::optional<at::Tensor>& draft_keep, const std::optional<at::Tensor>& target_keep,
    const at::Tensor& budget) {
  return verify_padded_impl(draft_logits, draft_tokens, target_logits, seed, positions,
                            temperature, alpha, rule, draft_keep, target_keep, &budget);
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
      "verify_padded.budget(Tensor draft_logits, Tensor draft_tokens, Tensor target_logits, "
      "Tensor seed, Tensor positions, Tensor temperature, Tensor alpha, int rule, "
      "Tensor? draft_keep=None, Tensor? target_keep=None, *, Tensor budget) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "verify_padded.name(Tensor draft_logits, Tensor draft_tokens, Tensor target_logits, "
      "Tensor seed, Tensor positions, Tensor temperature, Tensor alpha, str rule, "
      "Tensor? draft_keep=None, Tensor? target_keep=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(speccascade, CPU, m) {
  m.impl("verify_ragged", &speccascade::verify_ragged_cpu);
  m.impl("verify_padded", &speccascade::verify_padded_cpu);
  m.impl("verify_padded.budget", &speccascade::verify_padded_budget_cpu);
}

TORCH_LIBRARY_IMPL(speccascade, CompositeImplicitAutograd, m) {
  m.impl("verify_ragged.name", &speccascade::verify_ragged_named);
  m.impl("verify_padded.name", &speccascade::verify_padded_named);
}
