// torch binding of the plain-CUDA sampler (sample.cu has no torch headers: it is reached only
// through the C launcher in sample.h). Compiled in the CUDA build, and for CPU tensors in the CUDA
// emulator's test build (SC_CUDA_EMU, csrc/emu/README.md).
#include "sample_cuda.h"

#include <ATen/ops/empty.h>

#include <cmath>

#include "device.h"
#include "sample.h"

namespace speccascade {

at::Tensor sample_cuda(const at::Tensor& logits, double temperature,
                          const at::Tensor& seeds, const at::Tensor& positions) {
  TORCH_CHECK(device::holds(logits), "sample_cuda: logits must be a CUDA tensor");
  TORCH_CHECK(logits.dim() == 2, "sample_cuda: logits must be [R, V], got ", logits.sizes());
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0.0,
              "sample_cuda: temperature must be finite and >= 0, got ", temperature);
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(vocab > 0, "sample_cuda: empty vocabulary");
  for (const auto* t : {&seeds, &positions}) {
    TORCH_CHECK(t->device() == logits.device() && t->scalar_type() == at::kLong &&
                    t->dim() == 1 && t->size(0) == rows,
                "sample_cuda: seeds and positions must be int64 tensors of shape [", rows,
                "] on the logits' device");
  }
  const device::Guard guard(logits.device());
  const at::Tensor l = logits.stride(1) == 1 ? logits : logits.contiguous();
  const at::Tensor s = seeds.contiguous();
  const at::Tensor p = positions.contiguous();
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  if (rows == 0) return out;

  int dtype = SC_FLOAT32;
  switch (l.scalar_type()) {
    case at::kFloat: dtype = SC_FLOAT32; break;
    case at::kHalf: dtype = SC_FLOAT16; break;
    case at::kBFloat16: dtype = SC_BFLOAT16; break;
    default:
      TORCH_CHECK(false, "sample_cuda: logits must be float32, float16 or bfloat16, got ",
                  l.scalar_type());
  }
  const cudaStream_t stream = device::stream();
  const cudaError_t err = sc_sample_launch(l.data_ptr(), dtype, rows, vocab, l.stride(0),
                                           temperature, s.data_ptr<int64_t>(),
                                           p.data_ptr<int64_t>(), out.data_ptr<int64_t>(), stream);
  TORCH_CHECK(err == cudaSuccess, "sample_cuda: launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace speccascade
