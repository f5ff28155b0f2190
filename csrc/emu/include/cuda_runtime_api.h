// Host-side CUDA runtime types of the CPU emulator (csrc/emu/README.md): what csrc/cuda's C
// launchers and their torch bindings use of <cuda_runtime_api.h>, and nothing else. No keyword
// macros here: the torch bindings include this header before torch's own.
#pragma once

#include <string>

enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
typedef enum cudaError cudaError_t;

typedef struct CUstream_st* cudaStream_t;

namespace sc_emu {

// The status of the last launch and, for a failed kernel, what the emulator saw.
struct LastError {
  cudaError_t code = cudaSuccess;
  std::string message;
};

inline LastError& last_error() {
  static thread_local LastError e;
  return e;
}

}  // namespace sc_emu

// Returns and clears the last launch status, as the CUDA runtime does.
inline cudaError_t cudaGetLastError() {
  const cudaError_t code = sc_emu::last_error().code;
  sc_emu::last_error().code = cudaSuccess;
  return code;
}

inline const char* cudaGetErrorString(cudaError_t code) {
  switch (code) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration:
    case cudaErrorLaunchFailure: return sc_emu::last_error().message.c_str();
  }
  return "unknown error";
}
