// int8 weights times int8 activations for few inputs (decode) on AVX-512 VNNI + VBMI2: what dynamic int8
// quantization does (activations quantized per input), on the bitmask, dense and parent layouts. Per 64 columns: one
// masked load of the row's packed values, one byte expand (vpexpandb) and one vpdpbusd per input, against four
// widen-convert-expand-multiply-add sequences of 16 lanes in the f32-activation kernel (Zen 4 runs 512-bit
// operations in two halves, so the count of vector operations sets the speed there).
//
// vpdpbusd multiplies unsigned bytes by signed ones. The inputs stay signed (q) and the weights become unsigned:
// w + 128 is w with its sign bit flipped (one xor), and a column the layout skips (a zero weight) becomes 128 by
// the same xor. So each product is (w + 128) q, and 128 times the input's sum, once per input and call, is taken
// off at the end: one vpdpbusd per weight vector and input, no per-row correction. Sums are exact in int32 for
// cols <= 65536 (|(w + 128) q| <= 255 * 127); the binding routes wider matrices to the f32 kernel.
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
inline void rows_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* x128,
                    const float* bias, float* y, int64_t ldy, int64_t r) {
  // Every array indexed by constants once unrolled, and no branch in the loop body: GCC then keeps the
  // accumulators in registers (with the old `first(k)` branch it stored them to the stack every 64 columns).
  const int64_t n = w.cols;
  const __m512i c128 = _mm512_set1_epi8((char)0x80);
  __m512i acc[R][B];
  const int8_t* vp[R];
  const uint8_t* bp[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; i++) {
    vp[i] = (const int8_t*)w.values + (DENSE ? (r + i) * n : w.row_ptr[r + i]);
    bp[i] = DENSE ? nullptr : w.bits + (r + i) * w.stride;
#pragma GCC unroll 8
    for (int b = 0; b < B; b++) acc[i][b] = _mm512_setzero_si512();
  }
  // Bitmask: the next pass's values and bits prefetched as one linear stream, a pass ahead. Rows of a few KB are
  // too short for the hardware prefetcher to train on each (without this the layout streamed at half the dense
  // layout's rate); the dense layout's longer rows need no help (prefetching them made it slower).
  const int64_t chunks = (n + 63) / 64;
  const char* pf = DENSE ? nullptr : (const char*)w.values + w.row_ptr[r + R];
  const int64_t pf_step = DENSE ? 0 : ((w.row_ptr[r + R] - w.row_ptr[r]) / chunks + 63) & ~(int64_t)63;
  const char* pfb = DENSE ? nullptr : (const char*)w.bits + (r + R) * w.stride;
  for (int64_t j = 0; j < n; j += 64) {
    if (!DENSE) {
      for (int64_t q = 0; q < pf_step; q += 64) _mm_prefetch(pf + q, _MM_HINT_T0);
      pf += pf_step;
      if ((j & 511) == 0)
#pragma GCC unroll 8
        for (int i = 0; i < R; i++) _mm_prefetch(pfb + i * w.stride + j / 8, _MM_HINT_T0);
    }
    __m512i xv[B];
#pragma GCC unroll 8
    for (int b = 0; b < B; b++) xv[b] = _mm512_loadu_si512((const void*)(xq + b * ldxq + j));
    const __mmask64 tail = DENSE ? first(n - j) : 0;
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) {
      __m512i wv;
      if (DENSE) {  // a masked load: never past the row's last value
        wv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, vp[i] + j), c128);
      } else {
        const uint64_t m = word_at(bp[i] + j / 8);
        const uint64_t k = _mm_popcnt_u64(m);
        // the packed values (a prefix load: never past the stored values; bzhi keeps all 64 bits for k = 64),
        // made unsigned, then spread to their columns over 128s (the skipped zeros' value); the xor before the
        // expand rather than after it measured faster on Zen 4
        const __m512i packed = _mm512_maskz_loadu_epi8(_bzhi_u64(~(uint64_t)0, (unsigned)k), vp[i]);
        wv = _mm512_mask_expand_epi8(c128, m, _mm512_xor_si512(packed, c128));
        vp[i] += k;
      }
#pragma GCC unroll 8
      for (int b = 0; b < B; b++) acc[i][b] = _mm512_dpbusd_epi32(acc[i][b], wv, xv[b]);  // u8 weights, s8 inputs
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; i++) {
    const float s = w.scales[r + i];
    for (int b = 0; b < B; b++) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[i][b]) - x128[b];
      y[b * ldy + r + i] = (float)dot * (s * sx[b]) + (bias ? bias[r + i] : 0.0f);
    }
  }
}

template <int R, int B, bool DENSE>
inline void rows_in_passes(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* x128,
                           const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  int64_t r = u0;
  for (; r + R <= u1; r += R) rows_q8<R, B, DENSE>(w, xq, ldxq, sx, x128, bias, y, ldy, r);
  for (; r < u1; r++) rows_q8<1, B, DENSE>(w, xq, ldxq, sx, x128, bias, y, ldy, r);
}

template <int B, bool DENSE>
inline void range_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* x128,
                     const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  // Rows per pass: the dense layout's rows of up to 4 KB one at a time, so the values are one sequential stream
  // (8 short rows in flight outran the prefetcher), longer rows 8 at a time; bitmask rows 2 at a time for one or
  // two inputs, 4 for more. Chosen on Zen 4 from ad-hoc runs; bench/quantized_decode.py and
  // bench/int8_competitors.py are the committed measure of the result.
  if (DENSE && B <= 2 && w.cols <= 4096)
    return rows_in_passes<1, B, DENSE>(w, xq, ldxq, sx, x128, bias, y, ldy, u0, u1);
  constexpr int R = DENSE ? (B <= 2 ? 8 : 4) : (B <= 2 ? 2 : 4);
  rows_in_passes<R, B, DENSE>(w, xq, ldxq, sx, x128, bias, y, ldy, u0, u1);
}

template <int A>
inline __mmask64 child_q8(const uint64_t* planes, int c) {
  if (A <= 2) return c ? planes[0] : ~planes[0];
  const uint64_t m0 = (c & 1) ? planes[0] : ~planes[0];
  const uint64_t m1 = (c & 2) ? planes[1] : ~planes[1];
  return m0 & m1;
}

template <int R, int B, int A>
inline void parents_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* x128,
                       const float* bias, float* y, int64_t ldy, int64_t i0) {
  constexpr int P = A <= 2 ? 1 : 2;
  const int64_t parents = w.rows / A, n = w.cols;
  const __m512i c128 = _mm512_set1_epi8((char)0x80);
  __m512i acc[R][A][B];
  const int8_t* vp[R];
  const uint8_t* pl[R][P];
#pragma GCC unroll 8
  for (int i = 0; i < R; i++) {
    vp[i] = (const int8_t*)w.values + (i0 + i) * n;
#pragma GCC unroll 2
    for (int k = 0; k < P; k++) pl[i][k] = w.bits + (k * parents + i0 + i) * w.stride;
#pragma GCC unroll 4
    for (int c = 0; c < A; c++)
#pragma GCC unroll 4
      for (int b = 0; b < B; b++) acc[i][c][b] = _mm512_setzero_si512();
  }
  // the next pass's values and planes prefetched a pass ahead, as the bitmask layout's
  const char* pf = (const char*)w.values + (i0 + R) * n;
  const char* pfp = (const char*)w.bits + (i0 + R) * w.stride;
  for (int64_t j = 0; j < n; j += 64) {
#pragma GCC unroll 8
    for (int q = 0; q < R; q++) _mm_prefetch(pf + q * n + j, _MM_HINT_T0);
    if ((j & 511) == 0)
#pragma GCC unroll 8
      for (int q = 0; q < R; q++) _mm_prefetch(pfp + q * w.stride + j / 8, _MM_HINT_T0);
    __m512i xv[B];
#pragma GCC unroll 4
    for (int b = 0; b < B; b++) xv[b] = _mm512_loadu_si512((const void*)(xq + b * ldxq + j));
    const __mmask64 tail = first(n - j);
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) {
      // never past the parent's last value; the lanes past it are 128, times inputs of 0
      const __m512i pv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(tail, vp[i] + j), c128);
      uint64_t pb[P];
#pragma GCC unroll 2
      for (int k = 0; k < P; k++) pb[k] = word_at(pl[i][k] + j / 8);
#pragma GCC unroll 4
      for (int c = 0; c < A; c++) {
        const __m512i wc = _mm512_mask_mov_epi8(c128, child_q8<A>(pb, c), pv);
#pragma GCC unroll 4
        for (int b = 0; b < B; b++) acc[i][c][b] = _mm512_dpbusd_epi32(acc[i][c][b], wc, xv[b]);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; i++) {
    const float s = w.scales[i0 + i];
    for (int c = 0; c < A; c++) {
      const int64_t row = (i0 + i) * A + c;
      for (int b = 0; b < B; b++) {
        const int32_t dot = _mm512_reduce_add_epi32(acc[i][c][b]) - x128[b];
        y[b * ldy + row] = (float)dot * (s * sx[b]) + (bias ? bias[row] : 0.0f);
      }
    }
  }
}

template <int B, int A>
inline void parent_range_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx,
                            const int32_t* x128, const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  // parents per pass: as many as 24 accumulator registers hold (A children x B inputs), at most 4
  constexpr int R = 24 / (A * B) > 4 ? 4 : 24 / (A * B);
  int64_t i = u0;
  for (; i + R <= u1; i += R) parents_q8<R, B, A>(w, xq, ldxq, sx, x128, bias, y, ldy, i);
  for (; i < u1; i++) parents_q8<1, B, A>(w, xq, ldxq, sx, x128, bias, y, ldy, i);
}

template <int B>
inline void range_any(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* x128,
                      const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  if (w.format == FPW_DENSE) return range_q8<B, true>(w, xq, ldxq, sx, x128, bias, y, ldy, u0, u1);
  if (w.format == FPW_BITMASK) return range_q8<B, false>(w, xq, ldxq, sx, x128, bias, y, ldy, u0, u1);
  switch (w.alpha) {
    case 2: return parent_range_q8<B, 2>(w, xq, ldxq, sx, x128, bias, y, ldy, u0, u1);
    case 3: return parent_range_q8<B, 3>(w, xq, ldxq, sx, x128, bias, y, ldy, u0, u1);
    default: return parent_range_q8<B, 4>(w, xq, ldxq, sx, x128, bias, y, ldy, u0, u1);
  }
}

// 128 times the sum of an input's quantized values (the columns past `cols` are 0): what the unsigned weights add
inline int32_t times128_sum(const int8_t* x, int64_t n) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; j += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512((const void*)(x + j)));
  return 128 * _mm512_reduce_add_epi32(acc);
}

void gemv_any(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, int64_t batch, const float* bias,
              float* y, int64_t ldy, int64_t u0, int64_t u1) {
  for (int64_t b0 = 0; b0 < batch; b0 += 4) {
    const int8_t* xb = xq + b0 * ldxq;
    float* yb = y + b0 * ldy;
    const int64_t nb = batch - b0 < 4 ? batch - b0 : 4;
    int32_t x128[4];
    for (int64_t b = 0; b < nb; b++) x128[b] = times128_sum(xb + b * ldxq, w.cols);
    switch (nb) {
      case 1: range_any<1>(w, xb, ldxq, sx + b0, x128, bias, yb, ldy, u0, u1); break;
      case 2: range_any<2>(w, xb, ldxq, sx + b0, x128, bias, yb, ldy, u0, u1); break;
      case 3: range_any<3>(w, xb, ldxq, sx + b0, x128, bias, yb, ldy, u0, u1); break;
      default: range_any<4>(w, xb, ldxq, sx + b0, x128, bias, yb, ldy, u0, u1); break;
    }
  }
}

// One unit's int8 values as dense rows (q, unscaled): what torch's int8 GEMM multiplies for token batches.
void unpack_unit_q8(const FpwMatrix& w, int8_t* dense, int64_t u) {
  const int64_t n = w.cols;
  if (w.format == FPW_DENSE) {
    memcpy(dense + u * n, (const int8_t*)w.values + u * n, (size_t)n);
    return;
  }
  if (w.format == FPW_BITMASK) {
    const int8_t* vp = (const int8_t*)w.values + w.row_ptr[u];
    const uint8_t* bp = w.bits + u * w.stride;
    for (int64_t j = 0; j < n; j += 64) {
      const uint64_t m = word_at(bp + j / 8);
      const uint64_t k = _mm_popcnt_u64(m);
      const __m512i packed = _mm512_maskz_loadu_epi8(_bzhi_u64(~(uint64_t)0, (unsigned)k), vp);
      _mm512_mask_storeu_epi8(dense + u * n + j, first(n - j), _mm512_maskz_expand_epi8(m, packed));
      vp += k;
    }
    return;
  }
  const int64_t parents = w.rows / w.alpha;
  for (int64_t j = 0; j < n; j += 64) {
    const __mmask64 tail = first(n - j);
    const __m512i pv = _mm512_maskz_loadu_epi8(tail, (const int8_t*)w.values + u * n + j);
    uint64_t pb[2] = {0, 0};
    for (int k = 0; k < w.planes; k++) pb[k] = word_at(w.bits + (k * parents + u) * w.stride + j / 8);
    for (int c = 0; c < w.alpha; c++) {
      const __mmask64 mc = w.alpha <= 2 ? child_q8<2>(pb, c) : child_q8<4>(pb, c);
      _mm512_mask_storeu_epi8(dense + (u * w.alpha + c) * n + j, tail, _mm512_maskz_mov_epi8(mc, pv));
    }
  }
}

}  // namespace

// fpw_quantize_inputs, 16 inputs at a time: the same results bit for bit (division, not a reciprocal; NaN and the
// clamps as fmaxf/fminf order them; round to nearest even, as nearbyintf under the default rounding mode).
extern "C" void fpw_quantize_inputs_avx512(const float* x, int64_t ldx, int64_t batch, int64_t cols, int8_t* xq,
                                           int64_t ldxq, float* sx) {
  const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
  for (int64_t b = 0; b < batch; b++) {
    const float* row = x + b * ldx;
    __m512 peak = _mm512_setzero_ps();
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = cols - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - j)) - 1);
      peak = _mm512_max_ps(_mm512_abs_ps(_mm512_maskz_loadu_ps(m, row + j)), peak);  // a NaN lane keeps the peak
    }
    const float top = _mm512_reduce_max_ps(peak);
    const float s = top > 0.0f ? top / 127.0f : 1.0f;
    sx[b] = s;
    const __m512 vs = _mm512_set1_ps(s);
    int8_t* out = xq + b * ldxq;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 m = cols - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (cols - j)) - 1);
      const __m512 q = _mm512_min_ps(_mm512_max_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(m, row + j), vs), lo), hi);
      _mm512_mask_cvtsepi32_storeu_epi8(out + j, m, _mm512_cvtps_epi32(q));
    }
    memset(out + cols, 0, (size_t)(ldxq - cols));
  }
}

extern "C" void fpw_unpack_q8_avx512vnni(const FpwMatrix* w, int8_t* dense, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; u++) unpack_unit_q8(*w, dense, u);
}

extern "C" void fpw_gemv_q8_avx512vnni(const FpwMatrix* w, const int8_t* xq, int64_t ldxq, const float* sx,
                                       int64_t batch, const float* bias, float* y, int64_t ldy, int64_t u0,
                                       int64_t u1) {
  gemv_any(*w, xq, ldxq, sx, batch, bias, y, ldy, u0, u1);
}

#pragma GCC pop_options
