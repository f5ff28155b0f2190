// What the torch bindings of csrc/cuda need of the device: in the CUDA build, CUDA tensors,
// c10's device guard and the current stream; in the CPU emulator's build (SC_CUDA_EMU:
// tests/cuda_emu.py compiles the same bindings and kernels for CPU tensors, csrc/emu/README.md),
// CPU tensors, no guard and no stream. The only place where the two builds differ.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_runtime_api.h>

#ifdef SC_CUDA_EMU

namespace speccascade::device {

inline bool holds(const at::Tensor& t) { return t.is_cpu(); }

struct Guard {
  explicit Guard(const at::Device&) {}
};

inline cudaStream_t stream() { return nullptr; }

}  // namespace speccascade::device

#else

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace speccascade::device {

inline bool holds(const at::Tensor& t) { return t.is_cuda(); }

using Guard = c10::cuda::CUDAGuard;

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace speccascade::device

#endif
