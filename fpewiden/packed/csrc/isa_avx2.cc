// The AVX2 + FMA variant of the packed kernels (kernel_impl.h): 8 lanes; no expand instruction, so a table maps
// each 8-bit mask to the permutation that spreads the packed values, and to the lanes it keeps.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "fpw_kernels.h"
#include "half.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")

namespace fpw_avx2 {

struct Lut {
  alignas(32) int32_t idx[256][8];
  alignas(32) int32_t on[256][8];
  constexpr Lut() : idx(), on() {
    for (int m = 0; m < 256; m++) {
      int k = 0;
      for (int l = 0; l < 8; l++) {
        const bool set = (m >> l) & 1;
        idx[m][l] = set ? k++ : 0;
        on[m][l] = set ? -1 : 0;
      }
    }
  }
};
constexpr Lut LUT{};

// int4 values: the byte each of 8 lanes reads and the shift that tops its nibble (isa_avx512.cc explains)
struct I4Tables {
  alignas(16) uint8_t bytes[2][16];
  alignas(32) int32_t shifts[2][8];
  constexpr I4Tables() : bytes(), shifts() {
    for (int odd = 0; odd < 2; odd++)
      for (int l = 0; l < 16; l++) {
        bytes[odd][l] = (uint8_t)(l < 8 ? (l + odd) / 2 : 0x80);
        if (l < 8) shifts[odd][l] = ((l + odd) % 2) ? 24 : 28;
      }
  }
};
constexpr I4Tables I4{};

struct V {
  static constexpr int W = 8, BMAX = 4, ACC = 8;
  using reg = __m256;
  using mask = uint32_t;  // the low 8 bits
  static mask bits(const uint8_t* row, int64_t j) { return row[j / 8]; }
  static mask tail(int n) { return (1u << n) - 1; }
  static int count(mask m) { return __builtin_popcount(m & 0xffu); }
  static __m256 lanes(mask m) { return _mm256_load_ps((const float*)LUT.on[m & 0xffu]); }
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float f) { return _mm256_set1_ps(f); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static reg load_n(const float* p, int n) { return _mm256_maskload_ps(p, _mm256_castps_si256(lanes(tail(n)))); }
  template <int DT>
  static reg values(const void* base, int64_t i) {
    if (DT == FPW_F32) return _mm256_loadu_ps((const float*)base + i);
    if (DT == FPW_I8)
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)((const int8_t*)base + i))));
    if (DT == FPW_I4) {  // 8 nibbles from element i, as the AVX-512 variant reads 16 (isa_avx512.cc)
      const int odd = (int)(i & 1);
      const __m128i b = _mm_loadl_epi64((const __m128i*)((const uint8_t*)base + (i >> 1)));
      const __m128i twice = _mm_shuffle_epi8(b, _mm_load_si128((const __m128i*)I4.bytes[odd]));
      const __m256i top = _mm256_sllv_epi32(_mm256_cvtepu8_epi32(twice), _mm256_load_si256((const __m256i*)I4.shifts[odd]));
      return _mm256_cvtepi32_ps(_mm256_srai_epi32(top, 28));
    }
    const __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)base + i));
    if (DT == FPW_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
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
  static reg expand(mask m, reg v) {
    const __m256i idx = _mm256_load_si256((const __m256i*)LUT.idx[m & 0xffu]);
    return _mm256_and_ps(_mm256_permutevar8x32_ps(v, idx), lanes(m));
  }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mfma(mask m, reg a, reg b, reg c) { return _mm256_fmadd_ps(_mm256_and_ps(a, lanes(m)), b, c); }
  static float sum(reg r) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static void store(float* p, reg r) { _mm256_storeu_ps(p, r); }
  static void store_n(float* p, reg r, int n) { _mm256_maskstore_ps(p, _mm256_castps_si256(lanes(tail(n))), r); }
};

#include "kernel_impl.h"

}  // namespace fpw_avx2

#pragma GCC pop_options

extern "C" const FpwKernels* fpw_kernels_avx2(void) {
  static const FpwKernels k = {"avx2", fpw_avx2::gemv, fpw_avx2::spmm, fpw_avx2::unpack};
  return &k;
}
