// The CUDA emulator's test module (csrc/emu/README.md, built by tests/cuda_emu.py): csrc/cuda's
// own torch bindings, compiled with SC_CUDA_EMU for CPU tensors, bound with pybind11 under the
// names and argument orders of the ops they implement in the CUDA build
// (torch.ops.speccascade.verify_padded / verify_ragged, speccascade_fast._C.sample_cuda;
// verify_padded_budget is the op verify_padded.budget).
// Their kernels (csrc/cuda/*.cu, rewritten only where CUDA's syntax is not C++) are linked in
// from their own translation units, with the emulator's self-test kernels (selftest.cu).
#include <torch/extension.h>

#include "../cuda/sample_cuda.cpp"
#include "../cuda/verify_cuda.cpp"

#include <string>
#include <tuple>
#include <vector>

// selftest.cu: kernels with and without the bugs the emulator must expose
extern "C" cudaError_t sc_emu_selftest(const char* name, int64_t* out);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("verify_padded", &speccascade::verify_padded_cuda, py::arg("draft_logits"),
        py::arg("draft_tokens"), py::arg("target_logits"), py::arg("seed"),
        py::arg("positions"), py::arg("temperature"), py::arg("alpha"), py::arg("rule"),
        py::arg("draft_keep") = py::none(), py::arg("target_keep") = py::none());
  m.def("verify_padded_budget", &speccascade::verify_padded_budget_cuda, py::arg("draft_logits"),
        py::arg("draft_tokens"), py::arg("target_logits"), py::arg("seed"),
        py::arg("positions"), py::arg("temperature"), py::arg("alpha"), py::arg("rule"),
        py::arg("draft_keep") = py::none(), py::arg("target_keep") = py::none(), py::kw_only(),
        py::arg("budget"));
  m.def("verify_ragged", &speccascade::verify_ragged_cuda, py::arg("draft_logits"),
        py::arg("draft_tokens"), py::arg("target_logits"), py::arg("cu_num_draft_tokens"),
        py::arg("bonus_draft_logits"), py::arg("seed"), py::arg("positions"),
        py::arg("temperature"), py::arg("alpha"), py::arg("rule"),
        py::arg("draft_keep") = py::none(), py::arg("target_keep") = py::none(),
        py::arg("bonus_keep") = py::none(), py::arg("max_spec_len") = 0);
  m.def("sample_cuda", &speccascade::sample_cuda, py::arg("logits"), py::arg("temperature"),
        py::arg("seeds"), py::arg("positions"));
  m.def(
      "selftest",
      [](const std::string& name) {
        std::vector<int64_t> out(64);
        const cudaError_t err = sc_emu_selftest(name.c_str(), out.data());
        return std::make_tuple(std::string(err == cudaSuccess ? "" : cudaGetErrorString(err)), out);
      },
      py::arg("name"), "(error message or '', the 64 outputs) of selftest.cu's case `name`");
}
