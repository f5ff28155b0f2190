// The speccascade_fast._C module. CPU kernels always; CUDA ones when built with SC_WITH_CUDA.
#include <torch/extension.h>

#include "cpu/sample_cpu.h"

#ifdef SC_WITH_CUDA
#include "cuda/sample_cuda.h"
#endif

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "speccascade_fast compiled kernels";
  m.def("sample_cpu", &speccascade::sample_cpu, pybind11::arg("logits"),
        pybind11::arg("temperature"), pybind11::arg("seeds"), pybind11::arg("positions"),
        "Fused drafter sampling (argmax for T == 0, counter-based Gumbel-max race for T > 0) of "
        "logits [R, V] (fp32/fp16/bf16) with int64 seeds/positions [R]; returns int64 [R].");
  // Overload tried when `temperature` is a tensor: one temperature per row.
  m.def("sample_cpu", &speccascade::sample_cpu_rowwise, pybind11::arg("logits"),
        pybind11::arg("temperature"), pybind11::arg("seeds"), pybind11::arg("positions"),
        pybind11::arg("keep") = pybind11::none());
#ifdef SC_WITH_CUDA
  m.def("sample_cuda", &speccascade::sample_cuda, pybind11::arg("logits"),
        pybind11::arg("temperature"), pybind11::arg("seeds"), pybind11::arg("positions"),
        "CUDA twin of sample_cpu (same tokens up to floating-point near-ties).");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
