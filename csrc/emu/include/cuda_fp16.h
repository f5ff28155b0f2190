// __half of the CPU emulator (csrc/emu/README.md): storage and the conversions csrc/cuda uses.
#pragma once

#include <cstdint>
#include <cstring>

struct __half {
  unsigned short x;
};

inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }

// IEEE binary16 -> binary32, exact.
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t exponent = (h.x >> 10) & 0x1fu, mantissa = h.x & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, NaN
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else {
    float f = static_cast<float>(mantissa) * 0x1p-24f;  // zero, subnormal: exact
    std::memcpy(&bits, &f, sizeof bits);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
