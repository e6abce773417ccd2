// bf16, IEEE fp16 and int4 nibbles to numbers without intrinsics (the portable kernels and the unpack path).
#pragma once
#include <stdint.h>
#include <string.h>

static inline float fpw_bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline float fpw_half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise the mantissa
      int e = -1;
      do {
        e++;
        man <<= 1;
      } while (!(man & 0x400u));
      u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// Element i of int4 values (two per byte, element 2k in the low nibble of byte k, two's complement).
static inline int fpw_nibble(const uint8_t* p, int64_t i) {
  const int v = (p[i >> 1] >> ((i & 1) * 4)) & 15;
  return (v ^ 8) - 8;
}
