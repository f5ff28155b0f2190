// Top-k / top-p keep bounds on CPU: the fast twin of speccascade_fast/truncation.py.
//
//   keep_bounds(Tensor logits [R, V] (fp32/fp16/bf16), Tensor temperature [R] f64, int? top_k,
//               float? top_p) -> Tensor [R, 2] f64 = (tau, cut) per row
//
// The kept set of a row is K = {v : l_v > tau or (l_v == tau and v <= cut)} (truncation.py has
// the derivation); rows with T = 0 get (-inf, V - 1): keep all. Instead of the reference's sort,
// expected O(V) per row:
//   * top-k: tau = the k-th largest logit (std::nth_element); ties with it are kept (cut = V - 1);
//   * top-p (after top-k): the weights w_v = exp((l_v - max) / T) of the kept tokens, Z = sum w;
//     the last kept token t is the first one, walking by logit descending and ties by lower id,
//     whose cumulative weight reaches top_p * Z. Over top-k's few tokens, or (top-p alone) inside
//     the one bin of a 2048-bin histogram of the weight by distance from the max that holds it,
//     a quickselect on the logit values finds it: a pivot splits the range into (> pivot,
//     == pivot, < pivot), only the part that holds t is kept, the == part is walked by id.
//     (tau, cut) = (l_t, t).
// Weights are a fp32 exp summed in fp64, the kernel's numerics: the bound differs from the
// float64 reference only where a cumulative mass lies within ~1e-7 relative of top_p * Z.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#include "verify_kernels.h"
#pragma GCC pop_options

namespace speccascade {
namespace {

constexpr double kInfD = std::numeric_limits<double>::infinity();

struct Cand {
  float x;
  int32_t id;
  double w;
};

// w = exp((x - m) / T) and the distance bin min(floor((m - x) / T * scale), nbins - 1), which is
// monotone in the logit (compiled per ISA, as the verification kernels).
SC_VERIFY_CLONES void weights_and_bins(const float* x, int n, float m, float inv_t, float scale,
                                       int nbins, float* w, uint16_t* bin) {
  const float top = static_cast<float>(nbins - 1);
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    w[i] = verify_kernels::exp_f32((x[i] - m) * inv_t);
    const float d = (m - x[i]) * inv_t * scale;  // >= 0 (+inf for a masked token)
    const float c = d < top ? d : top;
    bin[i] = static_cast<uint16_t>(static_cast<int32_t>(c));
  }
}

// Candidates [lo, hi) -> t, the first in (x desc, id asc) order whose cumulative weight, added to
// acc, reaches target. Returns false if none does (the caller widens the candidate set).
bool walk_to(std::vector<Cand>& cand, size_t lo, size_t hi, double acc, double target,
             double* out) {
  uint64_t rs = 0x9E3779B97F4A7C15ULL;
  while (hi - lo > 32) {
    rs = mix64(rs + 1);
    const float pivot = cand[lo + rs % (hi - lo)].x;
    // three-way partition: [lo, gt) > pivot, [gt, eq) == pivot, [eq, hi) < pivot
    auto mid = std::partition(cand.begin() + lo, cand.begin() + hi,
                              [pivot](const Cand& c) { return c.x > pivot; });
    auto end_eq = std::partition(mid, cand.begin() + hi,
                                 [pivot](const Cand& c) { return c.x == pivot; });
    const size_t gt = static_cast<size_t>(mid - cand.begin());
    const size_t eq = static_cast<size_t>(end_eq - cand.begin());
    double w_gt = 0.0, w_eq = 0.0;
    for (size_t i = lo; i < gt; ++i) w_gt += cand[i].w;
    for (size_t i = gt; i < eq; ++i) w_eq += cand[i].w;
    if (gt > lo && acc + w_gt >= target) {
      hi = gt;
    } else if (acc + w_gt + w_eq >= target) {
      acc += w_gt;
      lo = gt;
      hi = eq;
      break;  // t is among the ties: walked by id below
    } else {
      acc += w_gt + w_eq;
      lo = eq;
      if (lo == hi) return false;
    }
  }
  std::sort(cand.begin() + lo, cand.begin() + hi,
            [](const Cand& a, const Cand& b) { return a.x > b.x || (a.x == b.x && a.id < b.id); });
  for (size_t i = lo; i < hi; ++i) {
    acc += cand[i].w;
    if (acc >= target) {
      out[0] = cand[i].x;
      out[1] = cand[i].id;
      return true;
    }
  }
  return false;
}

// The k-th largest of x[0, V): a lower bound theta from block maxima (at least k blocks, so at
// least k logits are >= theta), then nth_element over the few logits >= theta.
float kth_largest(const float* x, int64_t V, int64_t k, std::vector<float>& scratch) {
  const int64_t nb = std::min<int64_t>(V, std::max<int64_t>(k, 64));
  const int64_t bs = (V + nb - 1) / nb;
  scratch.clear();
  for (int64_t b = 0; b < V; b += bs)
    scratch.push_back(verify_kernels::lane_max(x + b, static_cast<int>(std::min(bs, V - b))));
  float theta = -std::numeric_limits<float>::infinity();
  if (static_cast<int64_t>(scratch.size()) >= k) {
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
    theta = scratch[static_cast<size_t>(k - 1)];
  }
  scratch.clear();
  for (int64_t v = 0; v < V; ++v)
    if (x[v] >= theta) scratch.push_back(x[v]);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<float>());
  return scratch[static_cast<size_t>(k - 1)];
}

// One row of fp32 logits -> (tau, cut).
void row_bound(const float* x, int64_t V, double t, int64_t top_k, double top_p, double* out,
               std::vector<float>& scratch, std::vector<uint16_t>& bins, std::vector<Cand>& cand) {
  out[0] = -kInfD;
  out[1] = static_cast<double>(V - 1);
  if (t <= 0.0) return;
  float tau_k = -std::numeric_limits<float>::infinity();
  if (top_k > 0 && top_k < V) {
    tau_k = kth_largest(x, V, top_k, scratch);
    out[0] = tau_k;
  }
  if (!(top_p >= 0.0)) return;  // no top-p (NaN marks "absent")
  const float m = verify_kernels::lane_max(x, static_cast<int>(V));
  if (m == -std::numeric_limits<float>::infinity()) return;  // (an all-masked row: keep all)
  const float inv_t = static_cast<float>(1.0 / t);
  if (top_k > 0 && top_k < V) {  // top-p over top-k's few tokens
    cand.clear();
    double Z = 0.0;
    for (int64_t v = 0; v < V; ++v) {
      if (x[v] >= tau_k) {
        const float w = verify_kernels::exp_f32((x[v] - m) * inv_t);
        if (w > 0.0f) cand.push_back({x[v], static_cast<int32_t>(v), static_cast<double>(w)});
        Z += w;
      }
    }
    if (walk_to(cand, 0, cand.size(), 0.0, top_p * Z, out)) return;
  } else {
    // The weights (vectorised) and their sum; a histogram of the weight by distance from the
    // max, d = (m - l) / T, in kBins bins of 1/32 nat (the last one holds everything beyond
    // 64 nats). The bin index is monotone in the logit, so each bin is a contiguous stretch of
    // the walk: t lies in the first bin where the cumulative weight reaches the target, and only
    // that bin's tokens are walked (starting from the weight of the bins before it). If
    // rounding stops that walk short, every token of positive weight is walked from 0.
    scratch.resize(static_cast<size_t>(V));
    bins.resize(static_cast<size_t>(V));
    float* w = scratch.data();
    uint16_t* bin = bins.data();
    constexpr int kBins = 2048;
    constexpr float kScale = kBins / 64.0f;
    weights_and_bins(x, static_cast<int>(V), m, inv_t, kScale, kBins, w, bin);
    const double Z = verify_kernels::lane_sum(w, static_cast<int>(V));
    const double target = top_p * Z;
    // four interleaved histograms: consecutive tokens often share a bin
    std::vector<double> hist(4 * kBins, 0.0);
    int64_t v = 0;
    for (; v + 4 <= V; v += 4)
      for (int k = 0; k < 4; ++k) hist[k * kBins + bin[v + k]] += w[v + k];
    for (; v < V; ++v) hist[bin[v]] += w[v];
    double before = 0.0;
    int bstar = kBins - 1;
    for (int b = 0; b < kBins; ++b) {
      const double h = hist[b] + hist[kBins + b] + hist[2 * kBins + b] + hist[3 * kBins + b];
      if (before + h >= target) {
        bstar = b;
        break;
      }
      before += h;
    }
    cand.clear();
    for (int64_t u = 0; u < V; ++u)
      if (bin[u] == bstar && w[u] > 0.0f)
        cand.push_back({x[u], static_cast<int32_t>(u), static_cast<double>(w[u])});
    if (walk_to(cand, 0, cand.size(), before, target, out)) return;
    cand.clear();
    for (int64_t u = 0; u < V; ++u)
      if (w[u] > 0.0f) cand.push_back({x[u], static_cast<int32_t>(u), static_cast<double>(w[u])});
    if (walk_to(cand, 0, cand.size(), 0.0, target, out)) return;
  }
  // the target is not reached (top_p = 1 up to rounding): keep every token of positive weight
  if (!cand.empty()) {
    const auto last = std::min_element(cand.begin(), cand.end(), [](const Cand& a, const Cand& b) {
      return a.x < b.x || (a.x == b.x && a.id > b.id);
    });
    out[0] = last->x;
    out[1] = last->id;
  }
}

// Row r as fp32: in place for fp32 logits, else widened into `row` by the verification kernels'
// vectorised converters, block by block.
const float* load_row(const at::Tensor& logits, int64_t r, std::vector<float>& row) {
  const int64_t V = logits.size(1);
  if (logits.scalar_type() == at::kFloat) return logits.data_ptr<float>() + r * logits.stride(0);
  row.resize(static_cast<size_t>(V));
  const auto* src = static_cast<const uint16_t*>(logits.data_ptr()) + r * logits.stride(0);
  const bool bf16 = logits.scalar_type() == at::kBFloat16;
  for (int64_t b = 0; b < V; b += verify_kernels::kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(verify_kernels::kBlock, V - b));
    if (bf16)
      verify_kernels::convert_bf16(src + b, row.data() + b, n);
    else
      verify_kernels::convert_f16(src + b, row.data() + b, n);
  }
  return row.data();
}

at::Tensor keep_bounds_cpu(const at::Tensor& logits_in, const at::Tensor& temperature_in,
                           std::optional<int64_t> top_k, std::optional<double> top_p) {
  TORCH_CHECK(logits_in.dim() == 2 && logits_in.device().is_cpu(),
              "keep_bounds: logits must be a CPU tensor [R, V]");
  const auto st = logits_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "keep_bounds: logits must be float32, float16 or bfloat16, got ", st);
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t R = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V >= 1 && V < (int64_t{1} << 31), "keep_bounds: V must be in [1, 2^31)");
  const at::Tensor temperature = temperature_in.contiguous();
  TORCH_CHECK(temperature.device().is_cpu() && temperature.scalar_type() == at::kDouble &&
                  temperature.dim() == 1 && temperature.size(0) == R,
              "keep_bounds: temperature must be a CPU float64 tensor [R] = [", R, "]");
  TORCH_CHECK(!top_k.has_value() || (*top_k >= 1 && *top_k <= V),
              "keep_bounds: top_k must be in [1, V]");
  TORCH_CHECK(!top_p.has_value() || (*top_p > 0.0 && *top_p <= 1.0),
              "keep_bounds: top_p must be in (0, 1]");
  at::Tensor out = at::empty({R, 2}, logits.options().dtype(at::kDouble));
  const double* t = temperature.data_ptr<double>();
  double* o = out.data_ptr<double>();
  const int64_t k = top_k.value_or(0);
  const double p = top_p.has_value() ? *top_p : std::numeric_limits<double>::quiet_NaN();
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row, scratch;
    std::vector<uint16_t> bins;
    std::vector<Cand> cand;
    for (int64_t r = begin; r < end; ++r) {
      row_bound(load_row(logits, r, row), V, t[r], k, p, o + 2 * r, scratch, bins, cand);
    }
  });
  return out;
}

}  // namespace
}  // namespace speccascade

TORCH_LIBRARY_FRAGMENT(speccascade, m) {
  m.def("keep_bounds(Tensor logits, Tensor temperature, int? top_k, float? top_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(speccascade, CPU, m) {
  m.impl("keep_bounds", &speccascade::keep_bounds_cpu);
}
