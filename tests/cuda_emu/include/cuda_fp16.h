// Emulator shim (tests/cuda_emu): IEEE binary16 with round-to-nearest-even conversions.
#pragma once
#include "tl_cuda_emu.h"

struct __half {
  uint16_t __x;
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1fu;
  const uint32_t mant = h.__x & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf, NaN (payload kept)
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else {
    float f = float(mant) * (1.0f / 16777216.0f);  // subnormal: mant * 2^-24, exact
    memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  __half h;
  if (x >= 0x7f800000u) {  // inf; NaN stays NaN (quiet)
    h.__x = uint16_t(sign | (x > 0x7f800000u ? 0x7e00u | ((x >> 13) & 0x3ffu) : 0x7c00u));
  } else if (x >= 0x47800000u) {  // >= 65536: inf
    h.__x = uint16_t(sign | 0x7c00u);
  } else if (x < 0x38800000u) {  // below 2^-14: subnormal or zero, in units of 2^-24
    float a;
    memcpy(&a, &x, 4);
    h.__x = uint16_t(sign | uint32_t(nearbyintf(a * 16777216.0f)));  // RNE (default mode)
  } else {
    uint32_t r = ((((x >> 23) - 112) << 10) | ((x >> 13) & 0x3ffu));
    const uint32_t rest = x & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (r & 1u))) ++r;  // a carry may give inf: right
    h.__x = uint16_t(sign | r);
  }
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
