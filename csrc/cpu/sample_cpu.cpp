// Fused drafter sampling on CPU: one pass over the logits, no [R, V] temporaries.
//
// Work split: tasks are (row, chunk of V) pairs run by at::parallel_for (torch's OpenMP pool, so
// torch.set_num_threads applies and calls from inside a parallel region run serially). With
// R >= threads a task is a whole row; with few rows (the B = 1 drafter) each row is cut into
// about threads / R chunks, every chunk yields a partial argmax, and a serial pass combines them
// (ties to the lowest id, which makes the result independent of the split).
#include "sample_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "../keep_bound.h"
#include "../sample_common.h"

namespace speccascade {
namespace {

// Least work (vocabulary entries) worth handing to a thread: waking a pool thread costs
// microseconds, and much more when another process holds the other core. ATen's GRAIN_SIZE.
constexpr int64_t kMinChunk = 32768;

struct Best {
  double score;
  int64_t idx;
};

// G[k] >= g(u) for u in bucket k, rounded up to fp32 (16 KiB: stays in L1).
struct BoundTable {
  std::array<float, kBuckets> g;
  BoundTable() {
    for (int k = 0; k < kBuckets; ++k) {
      const double b = gumbel_bucket_bound(k);
      float f = static_cast<float>(b);
      if (static_cast<double>(f) < b) f = std::nextafter(f, std::numeric_limits<float>::infinity());
      g[k] = f;
    }
  }
};

const BoundTable& bound_table() {
  static const BoundTable table;  // thread-safe initialisation (C++11 magic statics)
  return table;
}

template <typename scalar_t>
inline float to_float(scalar_t x) {
  return static_cast<float>(x);
}

// argmax of the raw logits over [lo, hi) with torch.argmax's rule (first NaN, else first max).
template <typename scalar_t>
Best chunk_argmax(const scalar_t* row, int64_t lo, int64_t hi) {
  float best = to_float(row[lo]);
  int64_t bi = lo;
  if (std::isnan(best)) return {static_cast<double>(best), bi};
  for (int64_t v = lo + 1; v < hi; ++v) {
    const float x = to_float(row[v]);
    if (x > best) {
      best = x;
      bi = v;
    } else if (std::isnan(x)) {
      return {static_cast<double>(x), v};
    }
  }
  return {static_cast<double>(best), bi};
}

// Gumbel-max race over [lo, hi) for one row whose DRAFT key is `key`.
template <typename scalar_t>
Best chunk_race(const scalar_t* row, int64_t lo, int64_t hi, double temperature, uint64_t key,
                const float* table, const KeepBound& keep) {
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  // Seed the running best with the exact score of the largest logit: a good lower bound of the
  // chunk's maximum, so the pruning test rejects most entries from the start.
  const Best top = chunk_argmax(row, lo, hi);
  if (std::isnan(top.score)) return top;  // a NaN logit gives a NaN score, which wins
  if (top.score == kNegInf) {
    // Every weight is 0: all scores are -inf and the lowest id wins, as in torch.argmax.
    return {top.score, lo};
  }
  // (a truncated chunk's largest logit may lie outside the kept set: weight 0, score -inf)
  const bool top_kept = keep.kept(static_cast<float>(top.score), top.idx);
  Best best{top_kept ? gumbel_score(top.score, temperature, index_hash(key, top.idx)) : kNegInf,
            top_kept ? top.idx : lo};
  double thr = prune_threshold(best.score);
  const double inv_t = 1.0 / temperature;
  // A subnormal T overflows 1 / T; the bound is then meaningless, so evaluate every entry.
  const bool prune = std::isfinite(inv_t);
  for (int64_t v = lo; v < hi; ++v) {
    const uint64_t h = index_hash(key, static_cast<uint64_t>(v));
    const float xf = to_float(row[v]);
    const double x = static_cast<double>(xf);
    // x * inv_t approximates x / T; the threshold's margin covers the difference. -inf logits
    // give -inf here and are never evaluated (they cannot win against a finite best).
    const double bound = x * inv_t + static_cast<double>(table[hash_bucket(h)]);
    if ((bound >= thr || !prune) && keep.kept(xf, v)) {
      const double s = gumbel_score(x, temperature, h);
      if (better(s, v, best.score, best.idx)) {
        best = {s, v};
        thr = prune_threshold(s);
      }
    }
  }
  return best;
}

template <typename scalar_t>
void sample_impl(const scalar_t* logits, int64_t rows, int64_t vocab, int64_t row_stride,
                 const double* temps, int64_t temp_stride, const int64_t* seeds,
                 const int64_t* positions, const double* keep, int64_t* out) {
  const float* table = bound_table().g.data();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = 1;
  if (rows < threads) {
    const int64_t want = (threads + rows - 1) / rows;
    chunks = std::max<int64_t>(1, std::min<int64_t>(want, vocab / kMinChunk));
  }
  const int64_t chunk_len = (vocab + chunks - 1) / chunks;
  std::vector<Best> partial(static_cast<size_t>(rows * chunks));

  // Tasks per thread at least: small problems (R * V < 2 * kMinChunk) run on the calling thread.
  const int64_t grain = std::max<int64_t>(1, kMinChunk / chunk_len);
  at::parallel_for(0, rows * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / chunks;
      const int64_t lo = (task % chunks) * chunk_len;
      const int64_t hi = std::min(vocab, lo + chunk_len);
      const scalar_t* row = logits + r * row_stride;
      const double temperature = temps[r * temp_stride];
      if (temperature == 0.0) {
        partial[task] = chunk_argmax(row, lo, hi);
      } else {
        const uint64_t key = row_key(seeds[r], positions[r], kStreamDraft);
        const KeepBound k = KeepBound::from(keep != nullptr ? keep + 2 * r : nullptr, vocab);
        partial[task] = chunk_race(row, lo, hi, temperature, key, table, k);
      }
    }
  });

  for (int64_t r = 0; r < rows; ++r) {
    Best b = partial[r * chunks];
    for (int64_t c = 1; c < chunks; ++c) {
      const Best& p = partial[r * chunks + c];
      if (better(p.score, p.idx, b.score, b.idx)) b = p;
    }
    out[r] = b.idx;
  }
}

// Shared by the two public overloads: row r uses temperature temps[r * temp_stride].
at::Tensor sample_dispatch(const at::Tensor& logits, const double* tp, int64_t ts,
                              const at::Tensor& seeds, const at::Tensor& positions,
                              const std::optional<at::Tensor>& keep = std::nullopt) {
  TORCH_CHECK(logits.device().is_cpu(), "sample_cpu: logits must be on the CPU");
  TORCH_CHECK(logits.dim() == 2, "sample_cpu: logits must be [R, V], got ", logits.sizes());
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "sample_cpu: empty vocabulary");
  for (const auto* t : {&seeds, &positions}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1 &&
                    t->size(0) == rows,
                "sample_cpu: seeds and positions must be int64 CPU tensors of shape [", rows, "]");
  }
  // Unit stride along V is required; any row stride is fine (e.g. logits[:, -1, :] views).
  const at::Tensor l = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor s = seeds.contiguous();
  const at::Tensor p = positions.contiguous();
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;
  const double* kp = nullptr;
  if (keep.has_value()) {
    TORCH_CHECK(keep->device().is_cpu() && keep->scalar_type() == at::kDouble &&
                    keep->is_contiguous() && keep->dim() == 2 && keep->size(0) == rows &&
                    keep->size(1) == 2,
                "sample_cpu: keep must be a contiguous CPU float64 tensor [", rows, ", 2], got ",
                keep->scalar_type(), " ", keep->sizes());
    kp = keep->data_ptr<double>();
  }

  const int64_t stride = l.stride(0);
  const int64_t* sp = s.data_ptr<int64_t>();
  const int64_t* pp = p.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  switch (l.scalar_type()) {
    case at::kFloat:
      sample_impl(l.data_ptr<float>(), rows, vocab, stride, tp, ts, sp, pp, kp, op);
      break;
    case at::kHalf:
      sample_impl(l.data_ptr<at::Half>(), rows, vocab, stride, tp, ts, sp, pp, kp, op);
      break;
    case at::kBFloat16:
      sample_impl(l.data_ptr<at::BFloat16>(), rows, vocab, stride, tp, ts, sp, pp, kp, op);
      break;
    default:
      TORCH_CHECK(false, "sample_cpu: logits must be float32, float16 or bfloat16, got ",
                  l.scalar_type());
  }
  return out;
}

}  // namespace

at::Tensor sample_cpu(const at::Tensor& logits, double temperature,
                         const at::Tensor& seeds, const at::Tensor& positions) {
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0,
              "sample_cpu: temperature must be finite and >= 0, got ", temperature);
  return sample_dispatch(logits, &temperature, 0, seeds, positions);
}

at::Tensor sample_cpu_rowwise(const at::Tensor& logits, const at::Tensor& temperature,
                                 const at::Tensor& seeds, const at::Tensor& positions,
                                 const std::optional<at::Tensor>& keep) {
  TORCH_CHECK(logits.dim() == 2, "sample_cpu: logits must be [R, V], got ", logits.sizes());
  const int64_t rows = logits.size(0);
  TORCH_CHECK(temperature.numel() == 1 || temperature.numel() == rows,
              "sample_cpu: temperature must be a number or have ", rows, " entries, got ",
              temperature.numel());
  const at::Tensor t = temperature.to(at::kCPU, at::kDouble).contiguous();
  const double* tp = t.data_ptr<double>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    TORCH_CHECK(std::isfinite(tp[i]) && tp[i] >= 0.0,
                "sample_cpu: temperatures must be finite and >= 0, got ", tp[i]);
  }
  return sample_dispatch(logits, tp, t.numel() == 1 ? 0 : 1, seeds, positions, keep);
}

}  // namespace speccascade
