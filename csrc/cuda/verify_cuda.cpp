// torch binding of the plain-CUDA fused verification (verify.cu has no torch headers: it is reached
// only through the C launcher in verify.h). Compiled in the CUDA build, and for CPU tensors in the
// CUDA emulator's test build (SC_CUDA_EMU, csrc/emu/README.md; device.h holds the difference).
//
// Registers the CUDA kernels of the ops that csrc/cpu/verify_cpu_ops.cpp defines
// (torch.ops.speccascade.verify_padded, its .budget overload (a divergence budget per request;
// spent is a fourth output), verify_ragged; their .name overloads, defined there for every
// device, reach these through the dispatcher): calls with CUDA tensors come here.
// Per-request tensors (seed, positions, temperature, alpha) live on the logits' device; their
// VALUES (T >= 0 finite, alpha in the rule's range, token ids in [0, V)) are not read on the host
// (that would synchronise): speccascade_fast.verify and verify_ragged validate them before the op
// is called. verify_ragged reads cu_num_draft_tokens
// (B + 1 integers) on the host once: the output width max gamma_b + 1 and the grid depend on it,
// and it is validated there as on the CPU. With max_spec_len > 0 (vLLM's argument) the width is
// max_spec_len + 1 and cu is not read on the host at all, so the op can be captured in a CUDA
// graph and replayed with other cu values: the caller guarantees cu (0, strictly increasing,
// <= N: rows after cu[B] are padding, never read) and every gamma_b <= max_spec_len (the
// kernels clamp gamma_b to it only to stay inside their buffers).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "device.h"
#include "verify.h"

namespace speccascade {
namespace {

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return SC_FLOAT32;
    case at::kHalf: return SC_FLOAT16;
    case at::kBFloat16: return SC_BFLOAT16;
    default:
      TORCH_CHECK(false, "verify_padded (cuda): ", name,
                  " must be float32, float16 or bfloat16 (use the reference backend for ",
                  t.scalar_type(), ")");
  }
  return SC_FLOAT32;
}

at::Tensor unit_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

const double* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<double>() : nullptr; }

// seed, positions (int64), temperature, alpha (float64): [B] on the logits' device
void check_per_request(const char* op, const at::Device& device, int64_t B, const at::Tensor& seed,
                       const at::Tensor& positions, const at::Tensor& temperature,
                       const at::Tensor& alpha) {
  for (const auto& [t, name, dt] :
       {std::tuple<const at::Tensor&, const char*, at::ScalarType>{seed, "seed", at::kLong},
        {positions, "positions", at::kLong}, {temperature, "temperature", at::kDouble},
        {alpha, "alpha", at::kDouble}}) {
    TORCH_CHECK(t.device() == device && t.dim() == 1 && t.size(0) == B && t.scalar_type() == dt,
                op, " (cuda): ", name, " must be a ", dt, " tensor of shape [", B, "] on ", device,
                ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
}

// A top-k / top-p keep-bound tensor (speccascade_fast.truncation): float64 of shape `shape` on
// `device`, made contiguous; undefined when not given.
at::Tensor keep_tensor(const char* op, const char* name, const std::optional<at::Tensor>& keep,
                       const at::Device& device, at::IntArrayRef shape) {
  if (!keep.has_value()) return {};
  const at::Tensor& k = *keep;
  TORCH_CHECK(k.device() == device && k.scalar_type() == at::kDouble && k.sizes() == shape, op,
              " (cuda): ", name, " must be a float64 tensor ", shape, " on ", device, ", got ",
              k.scalar_type(), " ", k.sizes(), " on ", k.device());
  return k.contiguous();
}

// The three outputs, [B, gamma + 1] (tokens int64, deferred bool) and [B] (num_accepted), and
// with a divergence budget spent [B, gamma + 1] (float64); the insert stage (in
// accept_resample_kernel, verify.cu) writes every element.
struct Outputs {
  at::Tensor tokens, num_accepted, deferred, spent;
  Outputs(int64_t B, int64_t gamma, const at::TensorOptions& opts, bool budget = false)
      : tokens(at::empty({B, gamma + 1}, opts.dtype(at::kLong))),
        num_accepted(at::empty({B}, opts.dtype(at::kLong))),
        deferred(at::empty({B, gamma + 1}, opts.dtype(at::kBool))) {
    if (budget) spent = at::empty({B, gamma + 1}, opts.dtype(at::kDouble));
  }
};

// Fills the per-request pointers and outputs of `a`, allocates the scratch and enqueues the
// kernels of every stage (targets, accept, resample, insert: 2 or 3 launches) on the current
// stream (no host synchronisation).
std::tuple<at::Tensor, at::Tensor, at::Tensor> launch(
    const char* op, sc_verify_args& a, const at::Tensor& seed_in, const at::Tensor& positions_in,
    const at::Tensor& temperature_in, const at::Tensor& alpha_in, Outputs& out,
    const at::TensorOptions& opts) {
  const at::Tensor seed = seed_in.contiguous(), positions = positions_in.contiguous();
  const at::Tensor temperature = temperature_in.contiguous(), alpha = alpha_in.contiguous();
  a.temperature = temperature.data_ptr<double>();
  a.alpha = alpha.data_ptr<double>();
  a.seed = seed.data_ptr<int64_t>();
  a.positions = positions.data_ptr<int64_t>();
  a.tokens = out.tokens.data_ptr<int64_t>();
  a.num_accepted = out.num_accepted.data_ptr<int64_t>();
  a.deferred = reinterpret_cast<uint8_t*>(out.deferred.data_ptr<bool>());
  a.spent = out.spent.defined() ? out.spent.data_ptr<double>() : nullptr;
  // scratch from the caching allocator (inside a CUDA graph capture: the graph's pool)
  const at::Tensor workspace = at::empty({static_cast<int64_t>(sc_verify_workspace_bytes(&a))},
                                         opts.dtype(at::kByte));
  const cudaStream_t stream = device::stream();
  const cudaError_t err = sc_verify_padded_launch(&a, workspace.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, op, " (cuda): launch failed: ", cudaGetErrorString(err));
  return {out.tokens, out.num_accepted, out.deferred};
}

// verify_padded, and with budget_in (the divergence budget per request) its .budget overload:
// then the fourth output is spent (else undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_padded_impl(
    const at::Tensor& draft_logits_in, const at::Tensor& draft_tokens, const at::Tensor& target_logits_in,
    const at::Tensor& seed_in, const at::Tensor& positions_in, const at::Tensor& temperature_in,
    const at::Tensor& alpha_in, int64_t rule, const std::optional<at::Tensor>& draft_keep,
    const std::optional<at::Tensor>& target_keep, const at::Tensor* budget_in) {
  TORCH_CHECK(rule >= 0 && rule < SC_VERIFY_NUM_RULES, "verify_padded (cuda): rule id ", rule,
              " out of range [0, ", SC_VERIFY_NUM_RULES, ")");
  TORCH_CHECK(draft_logits_in.dim() == 3 && target_logits_in.dim() == 3 && draft_tokens.dim() == 2,
              "verify_padded (cuda): draft_logits [B, G, V], draft_tokens [B, gamma], "
              "target_logits [B, gamma + 1, V]");
  TORCH_CHECK(device::holds(target_logits_in), "verify_padded (cuda): target_logits must be a CUDA tensor");
  const auto device = target_logits_in.device();
  const int64_t B = draft_tokens.size(0), gamma = draft_tokens.size(1), V = target_logits_in.size(2);
  TORCH_CHECK(B >= 1 && gamma >= 1, "verify_padded (cuda): need B >= 1 and gamma >= 1");
  TORCH_CHECK(gamma <= SC_VERIFY_MAX_GAMMA, "verify_padded (cuda): gamma must be <= ",
              SC_VERIFY_MAX_GAMMA, ", got ", gamma);
  TORCH_CHECK(V >= 1 && V <= INT32_MAX && draft_logits_in.size(2) == V,
              "verify_padded (cuda): vocabulary mismatch or size outside [1, 2^31)");
  TORCH_CHECK(target_logits_in.size(0) == B && target_logits_in.size(1) == gamma + 1,
              "verify_padded (cuda): target_logits must be [", B, ", ", gamma + 1, ", V]");
  TORCH_CHECK(draft_logits_in.size(0) == B &&
                  (draft_logits_in.size(1) == gamma || draft_logits_in.size(1) == gamma + 1),
              "verify_padded (cuda): draft_logits must be [B, gamma or gamma + 1, V]");
  TORCH_CHECK(draft_logits_in.device() == device && draft_tokens.device() == device,
              "verify_padded (cuda): draft_logits, draft_tokens and target_logits must be on one "
              "CUDA device");
  TORCH_CHECK(draft_tokens.scalar_type() == at::kLong,
              "verify_padded (cuda): draft_tokens must be int64, got ", draft_tokens.scalar_type());
  check_per_request("verify_padded", device, B, seed_in, positions_in, temperature_in, alpha_in);
  // top-k / top-p keep bounds (speccascade_fast.truncation): float64 [B, rows, 2] per model
  const at::Tensor kq = keep_tensor("verify_padded", "draft_keep", draft_keep, device,
                                    {B, draft_logits_in.size(1), 2});
  const at::Tensor kp = keep_tensor("verify_padded", "target_keep", target_keep, device,
                                    {B, gamma + 1, 2});
  // the divergence budget: float64 [B] on the device (values >= 0: validated by the caller,
  // not read here, which would synchronise)
  at::Tensor budget;
  if (budget_in != nullptr) {
    TORCH_CHECK(budget_in->device() == device && budget_in->dim() == 1 && budget_in->size(0) == B &&
                    budget_in->scalar_type() == at::kDouble,
                "verify_padded (cuda): budget must be a float64 tensor of shape [", B, "] on ",
                device, ", got ", budget_in->scalar_type(), " ", budget_in->sizes(), " on ",
                budget_in->device());
    budget = budget_in->contiguous();
  }
  const device::Guard guard(device);
  const at::Tensor q = unit_stride(draft_logits_in), p = unit_stride(target_logits_in);
  Outputs out(B, gamma, target_logits_in.options(), budget.defined());

  sc_verify_args a{};
  a.budget = budget.defined() ? budget.data_ptr<double>() : nullptr;
  a.q = q.data_ptr();
  a.q_dtype = dtype_code(q, "draft_logits");
  a.q_sb = q.stride(0);
  a.q_sj = q.stride(1);
  a.p = p.data_ptr();
  a.p_dtype = dtype_code(p, "target_logits");
  a.p_sb = p.stride(0);
  a.p_sj = p.stride(1);
  a.x = draft_tokens.data_ptr<int64_t>();
  a.x_sb = draft_tokens.stride(0);
  a.x_sj = draft_tokens.stride(1);
  a.B = B;
  a.gamma = gamma;
  a.rq = q.size(1);
  a.V = V;
  a.rule = static_cast<int>(rule);
  a.q_keep = ptr_or_null(kq);
  a.p_keep = ptr_or_null(kp);
  const auto [tokens, num_accepted, deferred] = launch(
      "verify_padded", a, seed_in, positions_in, temperature_in, alpha_in, out,
      target_logits_in.options());
  return {tokens, num_accepted, deferred, out.spent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_padded_cuda(
    const at::Tensor& draft_logits, const at::Tensor& draft_tokens, const at::Tensor& target_logits,
    const at::Tensor& seed, const at::Tensor& positions, const at::Tensor& temperature,
    const at::Tensor& alpha, int64_t rule, const std::optional<at::Tensor>& draft_keep,
    const std::optional<at::Tensor>& target_keep) {
  const auto [tokens, num_accepted, deferred, spent] =
      verify_padded_impl(draft_logits, draft_tokens, target_logits, seed, positions, temperature,
                         alpha, rule, draft_keep, target_keep, nullptr);
  return {tokens, num_accepted, deferred};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> verify_padded_budget_cuda(
    const at::Tensor& draft_logits, const at::Tensor& draft_tokens, const at::Tensor& target_logits,
    const at::Tensor& seed, const at::Tensor& positions, const at::Tensor& temperature,
    const at::Tensor& alpha, int64_t rule, const std::optional<at::Tensor>& draft_keep,
    const std::optional<at::Tensor>& target_keep, const at::Tensor& budget) {
  return verify_padded_impl(draft_logits, draft_tokens, target_logits, seed, positions,
                            temperature, alpha, rule, draft_keep, target_keep, &budget);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_ragged_cuda(
    const at::Tensor& draft_logits_in, const at::Tensor& draft_tokens,
    const at::Tensor& target_logits_in, const at::Tensor& cu_in,
    const std::optional<at::Tensor>& bonus_in, const at::Tensor& seed_in,
    const at::Tensor& positions_in, const at::Tensor& temperature_in, const at::Tensor& alpha_in,
    int64_t rule, const std::optional<at::Tensor>& draft_keep,
    const std::optional<at::Tensor>& target_keep, const std::optional<at::Tensor>& bonus_keep,
    int64_t max_spec_len) {
  TORCH_CHECK(rule >= 0 && rule < SC_VERIFY_NUM_RULES, "verify_ragged (cuda): rule id ", rule,
              " out of range [0, ", SC_VERIFY_NUM_RULES, ")");
  TORCH_CHECK(draft_logits_in.dim() == 2 && target_logits_in.dim() == 2,
              "verify_ragged (cuda): draft_logits [N, V] and target_logits [N + B, V] must be 2-D");
  TORCH_CHECK(device::holds(target_logits_in), "verify_ragged (cuda): target_logits must be a CUDA tensor");
  const auto device = target_logits_in.device();
  TORCH_CHECK(cu_in.dim() == 1 && cu_in.size(0) >= 2 && cu_in.scalar_type() == at::kLong &&
                  cu_in.device() == device,
              "verify_ragged (cuda): cu_num_draft_tokens must be int64 [B + 1] with B >= 1 on ",
              device, ", got ", cu_in.scalar_type(), " ", cu_in.sizes(), " on ", cu_in.device());
  const int64_t B = cu_in.size(0) - 1, N = draft_logits_in.size(0), V = target_logits_in.size(1);
  TORCH_CHECK(V >= 1 && V <= INT32_MAX && draft_logits_in.size(1) == V,
              "verify_ragged (cuda): vocabulary mismatch or size outside [1, 2^31)");
  TORCH_CHECK(target_logits_in.size(0) == N + B, "verify_ragged (cuda): target_logits must have N + B = ",
              N + B, " rows, got ", target_logits_in.size(0));
  TORCH_CHECK(draft_tokens.dim() == 1 && draft_tokens.size(0) == N &&
                  draft_tokens.scalar_type() == at::kLong,
              "verify_ragged (cuda): draft_tokens must be int64 [N] = [", N, "]");
  TORCH_CHECK(draft_logits_in.device() == device && draft_tokens.device() == device,
              "verify_ragged (cuda): draft_logits, draft_tokens and target_logits must be on one "
              "CUDA device");
  check_per_request("verify_ragged", device, B, seed_in, positions_in, temperature_in, alpha_in);
  TORCH_CHECK(max_spec_len >= 0, "verify_ragged (cuda): max_spec_len must be >= 0 (0: from "
              "cu_num_draft_tokens), got ", max_spec_len);
  int64_t max_gamma = max_spec_len;
  if (max_spec_len == 0) {
    // the one host read: the per-request gammas fix the output width and the grid
    const at::Tensor cu_host = cu_in.to(at::kCPU).contiguous();
    const int64_t* c = cu_host.data_ptr<int64_t>();
    TORCH_CHECK(c[0] == 0 && c[B] == N,
                "verify_ragged (cuda): cu_num_draft_tokens must start at 0 and end at N = ", N);
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(c[b + 1] - c[b] >= 1,
                  "verify_ragged (cuda): every request needs gamma >= 1 drafts");
      max_gamma = std::max(max_gamma, c[b + 1] - c[b]);
    }
  }
  TORCH_CHECK(max_gamma <= SC_VERIFY_MAX_GAMMA, "verify_ragged (cuda): gamma must be <= ",
              SC_VERIFY_MAX_GAMMA, ", got ", max_gamma);
  at::Tensor bonus;
  if (bonus_in.has_value()) {
    bonus = unit_stride(*bonus_in);
    TORCH_CHECK(bonus.dim() == 2 && bonus.size(0) == B && bonus.size(1) == V &&
                    bonus.device() == device,
                "verify_ragged (cuda): bonus_draft_logits must be [B, V] = [", B, ", ", V,
                "] on ", device);
  }
  TORCH_CHECK(bonus.defined() || !bonus_keep.has_value(),
              "verify_ragged (cuda): bonus_keep needs bonus_draft_logits");
  const at::Tensor kq = keep_tensor("verify_ragged", "draft_keep", draft_keep, device, {N, 2});
  const at::Tensor kp = keep_tensor("verify_ragged", "target_keep", target_keep, device, {N + B, 2});
  const at::Tensor kb = keep_tensor("verify_ragged", "bonus_keep", bonus_keep, device, {B, 2});
  const device::Guard guard(device);
  const at::Tensor q = unit_stride(draft_logits_in), p = unit_stride(target_logits_in);
  const at::Tensor cu = cu_in.contiguous();
  Outputs out(B, max_gamma, target_logits_in.options());

  sc_verify_args a{};
  a.q = q.data_ptr();
  a.q_dtype = dtype_code(q, "draft_logits");
  a.q_sj = q.stride(0);
  a.p = p.data_ptr();
  a.p_dtype = dtype_code(p, "target_logits");
  a.p_sj = p.stride(0);
  a.x = draft_tokens.data_ptr<int64_t>();
  a.x_sj = draft_tokens.stride(0);
  a.B = B;
  a.gamma = max_gamma;
  a.rq = bonus.defined() ? max_gamma + 1 : max_gamma;
  a.V = V;
  a.rule = static_cast<int>(rule);
  a.q_keep = ptr_or_null(kq);
  a.p_keep = ptr_or_null(kp);
  a.cu = cu.data_ptr<int64_t>();
  if (bonus.defined()) {
    a.qb = bonus.data_ptr();
    a.qb_dtype = dtype_code(bonus, "bonus_draft_logits");
    a.qb_sb = bonus.stride(0);
    a.qb_keep = ptr_or_null(kb);
  }
  return launch("verify_ragged", a, seed_in, positions_in, temperature_in, alpha_in, out,
                target_logits_in.options());
}

}  // namespace
}  // namespace speccascade

#ifndef SC_CUDA_EMU  // (the emulator build binds these with pybind11: csrc/emu/bindings.cpp)
TORCH_LIBRARY_IMPL(speccascade, CUDA, m) {
  m.impl("verify_padded", &speccascade::verify_padded_cuda);
  m.impl("verify_padded.budget", &speccascade::verify_padded_budget_cuda);
  m.impl("verify_ragged", &speccascade::verify_ragged_cuda);
}
#endif
