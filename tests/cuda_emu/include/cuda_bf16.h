// Emulator shim (tests/cuda_emu): bfloat16 with round-to-nearest-even conversions.
#pragma once
#include "tl_cuda_emu.h"

struct __nv_bfloat16 {
  uint16_t __x;
};

inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t bits = uint32_t(h.__x) << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  __nv_bfloat16 h;
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    h.__x = uint16_t((x >> 16) | 0x40u);  // NaN stays NaN (quiet)
  } else {
    h.__x = uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  }
  return h;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
