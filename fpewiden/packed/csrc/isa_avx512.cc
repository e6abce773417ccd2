// The AVX-512 variant of the packed kernels (kernel_impl.h): 16 lanes, mask registers, register expands.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "fpw_kernels.h"
#include "half.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,bmi,bmi2,popcnt")

namespace fpw_avx512 {

// int4 values: which byte each of 16 lanes reads, and the shift that puts its nibble at the lane's top bits
// (low nibble 28, high 24), for a run starting at a low nibble (even element) or a high one (odd)
struct I4Tables {
  alignas(16) uint8_t bytes[2][16];
  alignas(64) int32_t shifts[2][16];
  constexpr I4Tables() : bytes(), shifts() {
    for (int odd = 0; odd < 2; odd++)
      for (int l = 0; l < 16; l++) {
        bytes[odd][l] = (uint8_t)((l + odd) / 2);
        shifts[odd][l] = ((l + odd) % 2) ? 24 : 28;
      }
  }
};
constexpr I4Tables I4{};

struct V {
  static constexpr int W = 16, BMAX = 8, ACC = 16;
  using reg = __m512;
  using mask = __mmask16;
  static mask bits(const uint8_t* row, int64_t j) {
    uint16_t m;
    memcpy(&m, row + j / 8, 2);
    return m;
  }
  static mask tail(int n) { return (mask)((1u << n) - 1); }
  static int count(mask m) { return __builtin_popcount((unsigned)m); }
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float f) { return _mm512_set1_ps(f); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static reg load_n(const float* p, int n) { return _mm512_maskz_loadu_ps(tail(n), p); }
  template <int DT>
  static reg values(const void* base, int64_t i) {
    reg r;
    if (DT == FPW_F32) {
      r = _mm512_loadu_ps((const float*)base + i);
    } else if (DT == FPW_I8) {
      r = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const int8_t*)base + i))));
    } else if (DT == FPW_I4) {
      // 16 nibbles from element i: each byte from i / 2 on given to the lanes of its nibbles, each nibble shifted
      // to the top of its lane and arithmetically down again (its two's complement value); odd i starts at the
      // first byte's high nibble
      const int odd = (int)(i & 1);
      const __m128i b = _mm_loadu_si128((const __m128i*)((const uint8_t*)base + (i >> 1)));
      const __m128i twice = _mm_shuffle_epi8(b, _mm_load_si128((const __m128i*)I4.bytes[odd]));
      const __m512i top = _mm512_sllv_epi32(_mm512_cvtepu8_epi32(twice), _mm512_load_si512(I4.shifts[odd]));
      r = _mm512_cvtepi32_ps(_mm512_srai_epi32(top, 28));
    } else {
      const __m256i h = _mm256_loadu_si256((const __m256i*)((const uint16_t*)base + i));
      r = DT == FPW_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
    }
    // keep the load a plain load: gcc folds it into vexpandps' memory form, which costs 3.4 cycles per 16 values
    // on Zen 4 against 2.3 for a load and a register expand
    __asm__("" : "+v"(r));
    return r;
  }
  template <int DT>
  static float scalar(const void* base, int64_t i) {
    if (DT == FPW_F32) return ((const float*)base)[i];
    if (DT == FPW_I8) return (float)((const int8_t*)base)[i];
    if (DT == FPW_I4) return (float)fpw_nibble((const uint8_t*)base, i);
    const uint16_t h = ((const uint16_t*)base)[i];
    if (DT == FPW_F16) return _cvtsh_ss(h);
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
  }
  static reg expand(mask m, reg v) { return _mm512_maskz_expand_ps(m, v); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mfma(mask m, reg a, reg b, reg c) { return _mm512_mask3_fmadd_ps(a, b, c, m); }
  static float sum(reg r) { return _mm512_reduce_add_ps(r); }
  static void store(float* p, reg r) { _mm512_storeu_ps(p, r); }
  static void store_n(float* p, reg r, int n) { _mm512_mask_storeu_ps(p, tail(n), r); }
};

#include "kernel_impl.h"

}  // namespace fpw_avx512

#pragma GCC pop_options

extern "C" const FpwKernels* fpw_kernels_avx512(void) {
  static const FpwKernels k = {"avx512", fpw_avx512::gemv, fpw_avx512::spmm, fpw_avx512::unpack};
  return &k;
}
