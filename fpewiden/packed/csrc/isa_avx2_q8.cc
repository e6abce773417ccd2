// int8 weights times int8 activations for few inputs (decode) on AVX2, the CPUs without AVX-512 VNNI (Zen 3, most
// desktop Intel): the bitmask, dense and parent layouts, as the VNNI kernel (isa_avx512_vnni.cc) runs them.
//
// vpmaddubsw multiplies unsigned bytes by signed ones and adds pairs into int16, saturating. The weights give the
// unsigned operand as |w| (vpabsb: -128 becomes 128, still exact as an unsigned byte) and the inputs take the
// weights' signs (vpsignb: q for w > 0, -q for w < 0, 0 for w = 0), so each product is |w| sign(w) q = w q, and a
// pair's sum is at most 2 * 128 * 127 = 32512 < 32767: never saturated (inputs are clamped to +-127). vpmaddwd by
// ones then adds pairs into int32. Sums are exact for cols <= 65536, as the VNNI kernel's, and both scale them with
// one explicit fused multiply-add (never left to the compiler's contraction), so both give the same outputs bit
// for bit. No vpexpandb here: a bitmask row's packed values are spread to their columns 16 at a time by
// vpshufb, from a table of each mask byte's shuffle (the high byte's offset by the low byte's popcount).
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "fpw_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")

namespace {

struct Spread {
  alignas(16) uint8_t ctrl[256][8];  // byte l of mask byte m: the index of its packed value, or 0x80 (a zero)
  alignas(16) uint8_t high[9][16];   // the second 8 lanes' offset: the first 8 lanes' popcount, in bytes 8..15
  constexpr Spread() : ctrl(), high() {
    for (int m = 0; m < 256; m++) {
      int k = 0;
      for (int l = 0; l < 8; l++) ctrl[m][l] = ((m >> l) & 1) ? (uint8_t)k++ : (uint8_t)0x80;
    }
    for (int k = 0; k <= 8; k++)
      for (int l = 8; l < 16; l++) high[k][l] = (uint8_t)k;  // 0x80 + k keeps its high bit: still a zero
  }
};
constexpr Spread SPREAD{};

inline uint64_t ctrl_word(unsigned m) {
  uint64_t c;
  memcpy(&c, SPREAD.ctrl[m], 8);
  return c;
}

// 16 columns of a bitmask row from mask bits `m` (16 bits): the packed values spread to their columns, zeros
// elsewhere; `vp` advances past the values used. Reads 16 bytes at vp: the values' FPW_PAD covers the last row.
inline __m128i spread16(const int8_t*& vp, unsigned m) {
  const unsigned lo = m & 0xFF, hi = m >> 8;
  const unsigned k = (unsigned)_mm_popcnt_u32(lo);
  __m128i c = _mm_set_epi64x((long long)ctrl_word(hi), (long long)ctrl_word(lo));
  c = _mm_add_epi8(c, _mm_load_si128((const __m128i*)SPREAD.high[k]));
  const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i*)vp), c);
  vp += k + (unsigned)_mm_popcnt_u32(hi);
  return v;
}

// The 32 bytes of a mask word's bits as 0xFF / 0x00 lanes: lane l is bit l of `m`.
inline __m256i byte_mask(uint32_t m) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32((int)m),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}

inline uint32_t bits32(const uint8_t* p) {
  uint32_t w;
  memcpy(&w, p, 4);
  return w;
}

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// acc += w . x over 32 bytes, exactly (see the top of the file)
inline __m256i dot32(__m256i acc, __m256i absw, __m256i w, __m256i x) {
  const __m256i p = _mm256_maddubs_epi16(absw, _mm256_sign_epi8(x, w));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

// Columns [j0, j1) of one bitmask or dense row against B inputs, into acc; `vp` is the row's values at column j0
// (bitmask: advanced past the values used). Columns run 32 at a time; where j1 = cols, the last 16 or fewer
// columns of a dense row are read as 16 bytes (the values' FPW_PAD covers the last row), the inputs past `cols`
// being 0. j0 is a multiple of 32.
template <int B, bool DENSE>
inline void cols_q8(const int8_t*& vp, const uint8_t* bp, const int8_t* xq, int64_t ldxq, int64_t j0, int64_t j1,
                    __m256i* acc, const int8_t* pf = nullptr, const uint8_t* pfb = nullptr) {
  int64_t j = j0;
  for (; j + 32 <= j1; j += 32) {
    if (pf != nullptr && ((j - j0) & 63) == 0) {  // the next row's stretch, a line per 64 columns
      _mm_prefetch((const char*)(pf + (j - j0)), _MM_HINT_T0);
      if (!DENSE && (j & 511) == 0) _mm_prefetch((const char*)(pfb + j / 8), _MM_HINT_T0);
    }
    __m256i wv;
    if (DENSE) {
      wv = _mm256_loadu_si256((const __m256i*)(vp + j - j0));
    } else {
      const uint32_t m = bits32(bp + j / 8);
      const __m128i a = spread16(vp, m & 0xFFFF);
      wv = _mm256_set_m128i(spread16(vp, m >> 16), a);
    }
    const __m256i absw = _mm256_abs_epi8(wv);
#pragma GCC unroll 4
    for (int b = 0; b < B; b++)
      acc[b] = dot32(acc[b], absw, wv, _mm256_loadu_si256((const __m256i*)(xq + b * ldxq + j)));
  }
  for (; j < j1; j += 16) {  // 16 columns in the low half, zeros in the high half
    __m128i w16;
    if (DENSE) {
      w16 = _mm_loadu_si128((const __m128i*)(vp + j - j0));
    } else {
      uint16_t m;
      memcpy(&m, bp + j / 8, 2);
      w16 = spread16(vp, m);
    }
    const __m256i wv = _mm256_zextsi128_si256(w16);
    const __m256i absw = _mm256_abs_epi8(wv);
#pragma GCC unroll 4
    for (int b = 0; b < B; b++) {  // the inputs' 16 bytes past these are 0 or ignored (weights of 0)
      const __m256i xv = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(xq + b * ldxq + j)));
      acc[b] = dot32(acc[b], absw, wv, xv);
    }
  }
  if (DENSE) vp += j1 - j0;
}

constexpr int64_t PREFETCH_BYTES = 8192;  // how far ahead row_q8 prefetches dense rows

// One bitmask or dense row against B inputs.
template <int B, bool DENSE>
inline void row_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const float* bias, float* y,
                   int64_t ldy, int64_t r) {
  const int8_t* vp = (const int8_t*)w.values + (DENSE ? r * w.cols : w.row_ptr[r]);
  __m256i acc[B];
#pragma GCC unroll 4
  for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_si256();
  // dense rows are one sequential stream: the row PREFETCH_BYTES ahead prefetched as this one is summed, as the
  // VNNI kernel does on Zen 5 (measured on that Zen 5 forced to these kernels, bench/results/quantized/
  // llama_ffn_zen5_avx2: not yet on an AVX2-only CPU)
  const int64_t ahead = DENSE ? (PREFETCH_BYTES + w.cols - 1) / w.cols : 0;
  const int8_t* pf = ahead > 0 && r + ahead < w.rows ? (const int8_t*)w.values + (r + ahead) * w.cols : nullptr;
  cols_q8<B, DENSE>(vp, DENSE ? nullptr : w.bits + r * w.stride, xq, ldxq, 0, w.cols, acc, pf);
  const float s = w.scales[r];
#pragma GCC unroll 4
  for (int b = 0; b < B; b++)
    y[b * ldy + r] = __builtin_fmaf((float)hsum(acc[b]), s * sx[b], bias ? bias[r] : 0.0f);
}

// Rows [u0, u1) where two or more inputs outgrow the L1 cache (B x cols bytes): CHUNK_BYTES of inputs at a time
// against ROWS rows, so each chunk is read from L1 by every row; per row the chunks' exact int32 sums add up to
// the same total as one pass (the outputs are row_q8's, bit for bit). The next row's stretch is prefetched: a few KB
// is too short for the hardware prefetcher to train on. 4 inputs of the 4096x22016 int8 matrix (Zen 5 forced to
// AVX2) took 11.58 ms against 3.84 for one before (bench/results/quantized/avx2_spread as of 863d836), 5.09
// against 3.68 with both (its results now).
constexpr int64_t CHUNK_BYTES = 16384, ROWS = 16;

template <int B, bool DENSE>
inline void rows_chunked_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const float* bias,
                            float* y, int64_t ldy, int64_t u0, int64_t u1) {
  const int64_t n = w.cols, chunk = CHUNK_BYTES / B / 32 * 32;
  for (int64_t r0 = u0; r0 < u1; r0 += ROWS) {
    const int rows = (int)(u1 - r0 < ROWS ? u1 - r0 : ROWS);
    int32_t sums[ROWS][B] = {};
    const int8_t* vp[ROWS];
    for (int i = 0; i < rows; i++) vp[i] = (const int8_t*)w.values + (DENSE ? (r0 + i) * n : w.row_ptr[r0 + i]);
    for (int64_t j0 = 0; j0 < n; j0 += chunk) {
      const int64_t j1 = n - j0 < chunk ? n : j0 + chunk;
      for (int i = 0; i < rows; i++) {
        __m256i acc[B];
#pragma GCC unroll 4
        for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_si256();
        // each row's stretch is a few KB, too short for the hardware prefetcher to train on: the next row's
        // (or the first row's next stretch) is prefetched while this one is summed
        const int next = i + 1 < rows ? i + 1 : 0;
        const int8_t* pf = i + 1 < rows || j1 < n ? vp[next] : nullptr;
        const uint8_t* pfb = DENSE ? nullptr : w.bits + (r0 + next) * w.stride + (i + 1 < rows ? 0 : j1 - j0) / 8;
        cols_q8<B, DENSE>(vp[i], DENSE ? nullptr : w.bits + (r0 + i) * w.stride, xq, ldxq, j0, j1, acc, pf, pfb);
#pragma GCC unroll 4
        for (int b = 0; b < B; b++) sums[i][b] += hsum(acc[b]);
      }
    }
    for (int i = 0; i < rows; i++) {
      const int64_t r = r0 + i;
      const float s = w.scales[r];
#pragma GCC unroll 4
      for (int b = 0; b < B; b++)
        y[b * ldy + r] = __builtin_fmaf((float)sums[i][b], s * sx[b], bias ? bias[r] : 0.0f);
    }
  }
}

// One parent's children against B inputs: the parent's dense values read once, each child's weights kept where its
// id (1 or 2 bit planes) names it.
template <int B, int A>
inline void parent_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const float* bias,
                      float* y, int64_t ldy, int64_t i) {
  const int64_t parents = w.rows / A, n = w.cols;
  const int8_t* vp = (const int8_t*)w.values + i * n;
  const uint8_t* p0 = w.bits + i * w.stride;
  const uint8_t* p1 = A > 2 ? w.bits + (parents + i) * w.stride : nullptr;
  __m256i acc[A][B];
#pragma GCC unroll 4
  for (int c = 0; c < A; c++)
#pragma GCC unroll 4
    for (int b = 0; b < B; b++) acc[c][b] = _mm256_setzero_si256();
  for (int64_t j = 0; j < n; j += 32) {
    // 32 bytes while at least 16 columns are left (past the parent's last value: the next parent's, or FPW_PAD's 16
    // zeros after the last, against inputs of 0), else 16 bytes and 16 zeros; a plane word read as 4 bytes stays
    // inside its row's whole 64-bit words
    const __m256i pv = n - j >= 16 ? _mm256_loadu_si256((const __m256i*)(vp + j))
                                   : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(vp + j)));
    const __m256i absp = _mm256_abs_epi8(pv);
    __m256i xs[B];  // the inputs with the parent's signs: shared by its children
#pragma GCC unroll 4
    for (int b = 0; b < B; b++) xs[b] = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(xq + b * ldxq + j)), pv);
    const __m256i m0 = byte_mask(bits32(p0 + j / 8));
    const __m256i m1 = A > 2 ? byte_mask(bits32(p1 + j / 8)) : _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int c = 0; c < A; c++) {
      const __m256i pick0 = (c & 1) ? m0 : _mm256_xor_si256(m0, _mm256_set1_epi8(-1));
      const __m256i pick = A > 2 ? _mm256_and_si256(pick0, (c & 2) ? m1 : _mm256_xor_si256(m1, _mm256_set1_epi8(-1)))
                                 : pick0;
      const __m256i absw = _mm256_and_si256(absp, pick);
#pragma GCC unroll 4
      for (int b = 0; b < B; b++)
        acc[c][b] = _mm256_add_epi32(acc[c][b],
                                     _mm256_madd_epi16(_mm256_maddubs_epi16(absw, xs[b]), _mm256_set1_epi16(1)));
    }
  }
  const float s = w.scales[i];
#pragma GCC unroll 4
  for (int c = 0; c < A; c++) {
    const int64_t row = i * A + c;
#pragma GCC unroll 4
    for (int b = 0; b < B; b++)
      y[b * ldy + row] = __builtin_fmaf((float)hsum(acc[c][b]), s * sx[b], bias ? bias[row] : 0.0f);
  }
}

template <int B>
inline void range_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const float* bias,
                     float* y, int64_t ldy, int64_t u0, int64_t u1) {
  if (B > 1 && w.format != FPW_PARENT && B * w.cols > CHUNK_BYTES) {
    if (w.format == FPW_DENSE)
      rows_chunked_q8<B, true>(w, xq, ldxq, sx, bias, y, ldy, u0, u1);
    else
      rows_chunked_q8<B, false>(w, xq, ldxq, sx, bias, y, ldy, u0, u1);
    return;
  }
  for (int64_t u = u0; u < u1; u++) {
    if (w.format == FPW_DENSE) {
      row_q8<B, true>(w, xq, ldxq, sx, bias, y, ldy, u);
    } else if (w.format == FPW_BITMASK) {
      row_q8<B, false>(w, xq, ldxq, sx, bias, y, ldy, u);
    } else if (w.alpha == 2) {
      parent_q8<B, 2>(w, xq, ldxq, sx, bias, y, ldy, u);
    } else if (w.alpha == 3) {
      parent_q8<B, 3>(w, xq, ldxq, sx, bias, y, ldy, u);
    } else {
      parent_q8<B, 4>(w, xq, ldxq, sx, bias, y, ldy, u);
    }
  }
}

}  // namespace

// int8 values only (int4 runs the f32-input kernels on AVX2); up to 4 inputs per pass over the weights, 2 for the
// parent layout (its children's sums take the registers).
extern "C" void fpw_gemv_q8_avx2(const FpwMatrix* w, const int8_t* xq, int64_t ldxq, const float* sx, int64_t batch,
                                 const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  const int64_t per = w->format == FPW_PARENT ? 2 : 4;
  for (int64_t b0 = 0; b0 < batch; b0 += per) {
    const int8_t* xb = xq + b0 * ldxq;
    float* yb = y + b0 * ldy;
    switch (batch - b0 < per ? batch - b0 : per) {
      case 1: range_q8<1>(*w, xb, ldxq, sx + b0, bias, yb, ldy, u0, u1); break;
      case 2: range_q8<2>(*w, xb, ldxq, sx + b0, bias, yb, ldy, u0, u1); break;
      case 3: range_q8<3>(*w, xb, ldxq, sx + b0, bias, yb, ldy, u0, u1); break;
      default: range_q8<4>(*w, xb, ldxq, sx + b0, bias, yb, ldy, u0, u1); break;
    }
  }
}

#pragma GCC pop_options
