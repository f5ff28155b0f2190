// __nv_bfloat16 of the CPU emulator (csrc/emu/README.md): storage and the conversion csrc/cuda
// uses.
#pragma once

#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
  unsigned short x;
};

// bfloat16 -> float32, exact: the top half of the float's bits.
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = static_cast<uint32_t>(h.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
