// int8 weights times int8 activations for few inputs (decode) on AVX-512 VNNI + VBMI2: what dynamic int8
// quantization does (activations quantized per input), on the bitmask and dense layouts. Per 64 columns: one
// masked load of the row's packed values, one byte expand (vpexpandb) and one vpdpbusd per input, against four
// widen-convert-expand-multiply-add sequences of 16 lanes in the f32-activation kernel (Zen 4 runs 512-bit
// operations in two halves, so the count of vector operations sets the speed there).
//
// vpdpbusd multiplies unsigned bytes by signed ones: inputs are stored as u = q + 128, and each row's sum of
// 128 * w (one more vpdpbusd against a vector of 128s, shared by all inputs) is subtracted at the end. Sums are
// exact in int32 for cols <= 65536 (|u w| <= 255 * 127); the binding routes wider matrices to the f32 kernel.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "fpw_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi2,bmi,bmi2,popcnt")

namespace {

inline uint64_t word_at(const uint8_t* p) {
  uint64_t w;
  memcpy(&w, p, 8);
  return w;
}

inline __mmask64 first(int64_t n) { return n >= 64 ? ~(__mmask64)0 : _bzhi_u64(~(uint64_t)0, (unsigned)n); }

template <int R, int B, bool DENSE>
inline void rows_q8(const FpwMatrix& w, const uint8_t* xq, int64_t ldxq, const float* sx, const float* bias, float* y,
                    int64_t ldy, int64_t r) {
  const int64_t n = w.cols;
  const int8_t* values = (const int8_t*)w.values;
  const __m512i c128 = _mm512_set1_epi8((char)0x80);
  __m512i acc[R][B], corr[R];
  int64_t p[R];
  for (int i = 0; i < R; i++) {
    p[i] = DENSE ? (r + i) * n : w.row_ptr[r + i];
    corr[i] = _mm512_setzero_si512();
    for (int b = 0; b < B; b++) acc[i][b] = _mm512_setzero_si512();
  }
  for (int64_t j = 0; j < n; j += 64) {
    __m512i xv[B];
    for (int b = 0; b < B; b++) xv[b] = _mm512_loadu_si512((const void*)(xq + b * ldxq + j));
    for (int i = 0; i < R; i++) {
      __m512i wv;
      if (DENSE) {  // a masked load: never past the row's last value
        wv = _mm512_maskz_loadu_epi8(first(n - j), values + p[i] + j);
      } else {
        const uint64_t m = word_at(w.bits + (r + i) * w.stride + j / 8);
        const int k = __builtin_popcountll(m);
        // the packed values first (a prefix load: never past the stored values), then spread to their columns
        __builtin_prefetch(values + p[i] + 512);
        wv = _mm512_maskz_expand_epi8(m, _mm512_maskz_loadu_epi8(first(k), values + p[i]));
        p[i] += k;
      }
      corr[i] = _mm512_dpbusd_epi32(corr[i], c128, wv);
      for (int b = 0; b < B; b++) acc[i][b] = _mm512_dpbusd_epi32(acc[i][b], xv[b], wv);
    }
  }
  for (int i = 0; i < R; i++) {
    const int32_t c = _mm512_reduce_add_epi32(corr[i]);
    const float s = w.scales[r + i];
    for (int b = 0; b < B; b++) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[i][b]) - c;
      y[b * ldy + r + i] = (float)dot * (s * sx[b]) + (bias ? bias[r + i] : 0.0f);
    }
  }
}

template <int B, bool DENSE>
inline void range_q8(const FpwMatrix& w, const uint8_t* xq, int64_t ldxq, const float* sx, const float* bias, float* y,
                     int64_t ldy, int64_t u0, int64_t u1) {
  // rows per pass: chosen by timing 11008x4096 with one input on one thread (AMD EPYC, Zen 4; ad-hoc runs, to be
  // redone by a committed script): more rows in flight helped the dense layout, fewer the bitmask one
  constexpr int R = DENSE ? (B <= 2 ? 8 : 4) : (B <= 2 ? 4 : 2);
  int64_t r = u0;
  for (; r + R <= u1; r += R) rows_q8<R, B, DENSE>(w, xq, ldxq, sx, bias, y, ldy, r);
  for (; r < u1; r++) rows_q8<1, B, DENSE>(w, xq, ldxq, sx, bias, y, ldy, r);
}

template <bool DENSE>
void gemv_layout(const FpwMatrix& w, const uint8_t* xq, int64_t ldxq, const float* sx, int64_t batch,
                 const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  for (int64_t b0 = 0; b0 < batch; b0 += 4) {
    const uint8_t* xb = xq + b0 * ldxq;
    float* yb = y + b0 * ldy;
    const int64_t nb = batch - b0 < 4 ? batch - b0 : 4;
    switch (nb) {
      case 1: range_q8<1, DENSE>(w, xb, ldxq, sx + b0, bias, yb, ldy, u0, u1); break;
      case 2: range_q8<2, DENSE>(w, xb, ldxq, sx + b0, bias, yb, ldy, u0, u1); break;
      case 3: range_q8<3, DENSE>(w, xb, ldxq, sx + b0, bias, yb, ldy, u0, u1); break;
      default: range_q8<4, DENSE>(w, xb, ldxq, sx + b0, bias, yb, ldy, u0, u1); break;
    }
  }
}

}  // namespace

#pragma GCC pop_options

extern "C" void fpw_gemv_q8_avx512vnni(const FpwMatrix* w, const uint8_t* xq, int64_t ldxq, const float* sx,
                                       int64_t batch, const float* bias, float* y, int64_t ldy, int64_t u0,
                                       int64_t u1) {
  if (w->format == FPW_DENSE)
    gemv_layout<true>(*w, xq, ldxq, sx, batch, bias, y, ldy, u0, u1);
  else
    gemv_layout<false>(*w, xq, ldxq, sx, batch, bias, y, ldy, u0, u1);
}
