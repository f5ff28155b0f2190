// torch binding of the plain-CUDA fused verification (verify.cu has no torch headers: it is reached
// only through the C launcher in verify.h). Compiled in the CUDA build only.
//
// Registers the CUDA kernels of the ops that csrc/cpu/verify_cpu.cpp defines
// (torch.ops.speccascade.verify_padded and its .name overload): the dispatcher sends calls with
// CUDA tensors here. Per-request tensors (seed, positions, temperature, alpha) live on the logits'
// device; their VALUES (T >= 0 finite, alpha in the rule's range, token ids in [0, V)) are not
// read on the host (that would synchronise): speccascade_fast.verify validates them before the
// op is called. verify_ragged has no CUDA kernel (speccascade_fast.ragged pads per request).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "verify.h"

namespace speccascade {
namespace {

// speccascade_fast.rules.RULES, in order (the ids of verify_cpu.cpp and verify.cu)
constexpr const char* kRuleNamesCuda[] = {
    "spec", "drafter", "chow", "chow_log", "diff", "diff_log", "opt", "opt_log",
    "token_v1", "token_v2", "token_v3", "lossy", "lossy_star", "bild"};
constexpr int64_t kNumRulesCuda = sizeof(kRuleNamesCuda) / sizeof(kRuleNamesCuda[0]);

int64_t rule_id_cuda(const std::string& name) {
  for (int64_t i = 0; i < kNumRulesCuda; ++i)
    if (name == kRuleNamesCuda[i]) return i;
  TORCH_CHECK(false, "speccascade verify (cuda): unknown rule '", name, "'");
  return -1;
}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_padded_cuda(
    const at::Tensor& draft_logits_in, const at::Tensor& draft_tokens, const at::Tensor& target_logits_in,
    const at::Tensor& seed_in, const at::Tensor& positions_in, const at::Tensor& temperature_in,
    const at::Tensor& alpha_in, int64_t rule, const std::optional<at::Tensor>& draft_keep,
    const std::optional<at::Tensor>& target_keep) {
  TORCH_CHECK(rule >= 0 && rule < kNumRulesCuda, "verify_padded (cuda): rule id ", rule,
              " out of range [0, ", kNumRulesCuda, ")");
  TORCH_CHECK(draft_logits_in.dim() == 3 && target_logits_in.dim() == 3 && draft_tokens.dim() == 2,
              "verify_padded (cuda): draft_logits [B, G, V], draft_tokens [B, gamma], "
              "target_logits [B, gamma + 1, V]");
  TORCH_CHECK(target_logits_in.is_cuda(), "verify_padded (cuda): target_logits must be a CUDA tensor");
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
  for (const auto& [t, name, dt] :
       {std::tuple<const at::Tensor&, const char*, at::ScalarType>{seed_in, "seed", at::kLong},
        {positions_in, "positions", at::kLong}, {temperature_in, "temperature", at::kDouble},
        {alpha_in, "alpha", at::kDouble}}) {
    TORCH_CHECK(t.device() == device && t.dim() == 1 && t.size(0) == B && t.scalar_type() == dt,
                "verify_padded (cuda): ", name, " must be a ", dt, " tensor of shape [", B,
                "] on ", device, ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
  }
  // top-k / top-p keep bounds (speccascade_fast.truncation): float64 [B, rows, 2] per model
  at::Tensor keeps[2];
  const std::optional<at::Tensor>* keep_in[2] = {&draft_keep, &target_keep};
  const int64_t keep_rows[2] = {draft_logits_in.size(1), gamma + 1};
  const char* keep_names[2] = {"draft_keep", "target_keep"};
  for (int i = 0; i < 2; ++i) {
    if (!keep_in[i]->has_value()) continue;
    const at::Tensor& k = keep_in[i]->value();
    TORCH_CHECK(k.device() == device && k.scalar_type() == at::kDouble && k.dim() == 3 &&
                    k.size(0) == B && k.size(1) == keep_rows[i] && k.size(2) == 2,
                "verify_padded (cuda): ", keep_names[i], " must be a float64 tensor [", B, ", ",
                keep_rows[i], ", 2] on ", device, ", got ", k.scalar_type(), " ", k.sizes(),
                " on ", k.device());
    keeps[i] = k.contiguous();
  }
  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor q = unit_stride(draft_logits_in), p = unit_stride(target_logits_in);
  const at::Tensor seed = seed_in.contiguous(), positions = positions_in.contiguous();
  const at::Tensor temperature = temperature_in.contiguous(), alpha = alpha_in.contiguous();

  const auto long_opts = target_logits_in.options().dtype(at::kLong);
  at::Tensor tokens = at::empty({B, gamma + 1}, long_opts);
  at::Tensor num_accepted = at::empty({B}, long_opts);
  at::Tensor deferred = at::empty({B, gamma + 1}, target_logits_in.options().dtype(at::kBool));

  sc_verify_args a{};
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
  a.temperature = temperature.data_ptr<double>();
  a.alpha = alpha.data_ptr<double>();
  a.seed = seed.data_ptr<int64_t>();
  a.positions = positions.data_ptr<int64_t>();
  a.B = B;
  a.gamma = gamma;
  a.rq = q.size(1);
  a.V = V;
  a.rule = static_cast<int>(rule);
  a.q_keep = keeps[0].defined() ? keeps[0].data_ptr<double>() : nullptr;
  a.p_keep = keeps[1].defined() ? keeps[1].data_ptr<double>() : nullptr;
  a.tokens = tokens.data_ptr<int64_t>();
  a.num_accepted = num_accepted.data_ptr<int64_t>();
  a.deferred = reinterpret_cast<uint8_t*>(deferred.data_ptr<bool>());

  // scratch from the caching allocator (inside a CUDA graph capture: the graph's pool)
  const at::Tensor workspace = at::empty({static_cast<int64_t>(sc_verify_workspace_bytes(&a))},
                                         target_logits_in.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const cudaError_t err = sc_verify_padded_launch(&a, workspace.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, "verify_padded (cuda): launch failed: ", cudaGetErrorString(err));
  return {tokens, num_accepted, deferred};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_padded_cuda_named(
    const at::Tensor& d, const at::Tensor& x, const at::Tensor& t, const at::Tensor& seed,
    const at::Tensor& positions, const at::Tensor& temperature, const at::Tensor& alpha,
    c10::string_view rule, const std::optional<at::Tensor>& draft_keep,
    const std::optional<at::Tensor>& target_keep) {
  return verify_padded_cuda(d, x, t, seed, positions, temperature, alpha,
                            rule_id_cuda(std::string(rule)), draft_keep, target_keep);
}

}  // namespace
}  // namespace speccascade

TORCH_LIBRARY_IMPL(speccascade, CUDA, m) {
  m.impl("verify_padded", &speccascade::verify_padded_cuda);
  m.impl("verify_padded.name", &speccascade::verify_padded_cuda_named);
}
