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
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx512vbmi2,bmi,bmi2,popcnt")

namespace {

inline uint64_t word_at(const uint8_t* p) {
  uint64_t w;
  memcpy(&w, p, 8);
  return w;
}

inline __mmask64 first(int64_t n) { return n >= 64 ? ~(__mmask64)0 : _bzhi_u64(~(uint64_t)0, (unsigned)n); }

template <int R, int B, bool DENSE, bool WHOLE = false>
inline void rows_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* x128,
                    const float* bias, float* y, int64_t ldy, int64_t r, int64_t ahead) {
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
  // The rows `ahead` of these (range_q8 sets how far) prefetched as they are summed: the values and bits of a
  // bitmask pass as one linear stream, dense rows a line each per 64 columns (only where fpw_q8_prefetch_bytes says
  // so: on Zen 4 prefetching dense rows made them slower). Rows of a few KB are too short for the hardware
  // prefetcher to train on each (without this the bitmask layout streamed at half the dense layout's rate).
  const bool ahead_ok = r + ahead + R <= w.rows;
  const char* dnext = DENSE && ahead_ok && fpw_q8_prefetch_bytes() > 0 ? (const char*)w.values + (r + ahead) * n
                                                                       : nullptr;
  const int64_t chunks = (n + 63) / 64;
  const char* pf = DENSE || !ahead_ok ? nullptr : (const char*)w.values + w.row_ptr[r + ahead];
  const int64_t pf_step =
      pf == nullptr ? 0 : ((w.row_ptr[r + ahead + R] - w.row_ptr[r + ahead]) / chunks + 63) & ~(int64_t)63;
  const char* pfb = pf == nullptr ? nullptr : (const char*)w.bits + (r + ahead) * w.stride;
  for (int64_t j = 0; j < n; j += 64) {
    if (DENSE && dnext != nullptr) {
#pragma GCC unroll 8
      for (int i = 0; i < R; i++) _mm_prefetch(dnext + i * n + j, _MM_HINT_T0);
    }
    if (!DENSE && pf != nullptr) {
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
        // the packed values (WHOLE: 64 bytes, where the stored values go on for 64 more; else a prefix load,
        // never past them: bzhi keeps all 64 bits for k = 64), made unsigned, then spread to their columns over
        // 128s (the skipped zeros' value); the xor before the expand rather than after it measured faster on Zen 4
        const __m512i packed = WHOLE ? _mm512_loadu_si512((const void*)vp[i])
                                     : _mm512_maskz_loadu_epi8(_bzhi_u64(~(uint64_t)0, (unsigned)k), vp[i]);
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
      y[b * ldy + r + i] = __builtin_fmaf((float)dot, s * sx[b], bias ? bias[r + i] : 0.0f);  // as fpw_gemv_q8_avx2
    }
  }
}

template <int R, int B, bool DENSE>
inline void rows_in_passes(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* x128,
                           const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  // How far ahead to prefetch: one pass, or where fpw_q8_prefetch_bytes names a distance, the rows that hold
  // that many bytes (the matrix's mean row: values and bits)
  const int64_t far = fpw_q8_prefetch_bytes();
  const int64_t row_bytes = DENSE ? w.cols : w.row_ptr[w.rows] / (w.rows > 0 ? w.rows : 1) + w.stride;
  const int64_t rows_far = far > 0 && row_bytes > 0 ? (far + row_bytes - 1) / row_bytes : 0;
  const int64_t ahead = rows_far > R ? rows_far : R;
  int64_t r = u0;
  if (!DENSE)  // whole 64-byte loads of a bitmask pass's values while they stay inside the stored values
    for (const int64_t end = w.row_ptr[w.rows] + FPW_PAD; r + R <= u1 && w.row_ptr[r + R] + 64 <= end; r += R)
      rows_q8<R, B, DENSE, true>(w, xq, ldxq, sx, x128, bias, y, ldy, r, ahead);
  for (; r + R <= u1; r += R) rows_q8<R, B, DENSE>(w, xq, ldxq, sx, x128, bias, y, ldy, r, ahead);
  for (; r < u1; r++) rows_q8<1, B, DENSE>(w, xq, ldxq, sx, x128, bias, y, ldy, r, ahead);
}

template <int B, bool DENSE>
inline void range_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* x128,
                     const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  // Rows per pass: dense rows one at a time for one or two inputs (one sequential stream: on Zen 4 and the Intel
  // Xeons only rows of up to 4 KB, measured in bench/results/quantized/decode; on Zen 5 all, prefetched
  // fpw_q8_prefetch_bytes ahead: decode_zen5_stream), else 8 for one or two inputs and 4 for more; bitmask rows 2
  // at a time for one or two inputs, 4 for more.
  if (DENSE && B <= 2 && (fpw_q8_prefetch_bytes() > 0 || w.cols <= 4096))
    return rows_in_passes<1, B, DENSE>(w, xq, ldxq, sx, x128, bias, y, ldy, u0, u1);
  constexpr int R = B > 4 ? 2 : DENSE ? (B <= 2 ? 8 : 4) : (B <= 2 ? 2 : 4);
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
                       const float* bias, float* y, int64_t ldy, int64_t i0, int64_t ahead) {
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
  // the values and planes of the parents `ahead` of these prefetched as they are summed, as the bitmask layout's
  const char* pf = (const char*)w.values + (i0 + ahead) * n;
  const char* pfp = (const char*)w.bits + (i0 + ahead) * w.stride;
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
        y[b * ldy + row] = __builtin_fmaf((float)dot, s * sx[b], bias ? bias[row] : 0.0f);
      }
    }
  }
}

template <int B, int A>
inline void parent_range_q8(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx,
                            const int32_t* x128, const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  // parents per pass: as many as 24 accumulator registers hold (A children x B inputs), at most 4; on Zen 5
  // (fpw_q8_prefetch_bytes > 0) one at a time for one or two inputs, one sequential stream prefetched that far
  // ahead, as dense rows (bench/results/quantized/q8_layouts against its before_parent_stream; bitmask rows, tried
  // alike, ran slower one at a time)
  const int64_t far = fpw_q8_prefetch_bytes(), per_parent = w.cols + (A <= 2 ? 1 : 2) * w.stride;
  if (B <= 2 && far > 0) {
    const int64_t ahead = (far + per_parent - 1) / per_parent;
    for (int64_t i = u0; i < u1; i++) parents_q8<1, B, A>(w, xq, ldxq, sx, x128, bias, y, ldy, i, ahead);
    return;
  }
  constexpr int R = 24 / (A * B) > 4 ? 4 : 24 / (A * B);
  int64_t i = u0;
  for (; i + R <= u1; i += R) parents_q8<R, B, A>(w, xq, ldxq, sx, x128, bias, y, ldy, i, R);
  for (; i < u1; i++) parents_q8<1, B, A>(w, xq, ldxq, sx, x128, bias, y, ldy, i, 1);
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

// ---------------------------------------------------------------- int4 weights (csrc/fpw_kernels.h's layout)
//
// Per 64 columns: the row's 64 nibbles (32 or 33 bytes, a masked load) spread one per byte by vpermb, each byte's
// nibble selected and made unsigned (q + 8, one vpternlog), one vpdpbusd per input. A group's scale cannot wait
// for the row's end, so each 64 columns' int32 sums (exact) are converted and multiplied by their lanes' group
// scales into an f32 sum: lane l holds columns j + 4l .. j + 4l + 3, all in one group (groups are >= 16
// columns). The sums start at -8 times each lane's four inputs, which takes the + 8 off again: the columns a
// layout skips are filled with 8 (q = 0) and the columns past `cols` meet inputs of 0, so no other correction.

struct Nibbles {
  alignas(64) uint8_t index[2][64];  // the byte each lane reads, for a run from an even (low) or odd nibble
  uint64_t high[2];                  // the lanes that take their byte's high nibble
  constexpr Nibbles() : index(), high() {
    for (int odd = 0; odd < 2; odd++)
      for (int t = 0; t < 64; t++) {
        index[odd][t] = (uint8_t)((odd + t) / 2);
        if ((odd + t) % 2) high[odd] |= (uint64_t)1 << t;
      }
  }
};
constexpr Nibbles NIB{};

// Elements e .. e + count - 1 (count <= 64) of int4 values as unsigned bytes q + 8; lanes past count are 8 or
// arbitrary (a bitmask row's next values: the expand drops them). Reads only the bytes those elements lie in.
inline __m512i nibbles_u8(const uint8_t* base, int64_t e, int64_t count) {
  const int odd = (int)(e & 1);
  const int64_t bytes = (e + count + 1) / 2 - e / 2;
  const __m512i raw = _mm512_maskz_loadu_epi8(_bzhi_u64(~(uint64_t)0, (unsigned)bytes), base + e / 2);
  const __m512i spread = _mm512_permutexvar_epi8(_mm512_load_si512(NIB.index[odd]), raw);
  const __m512i nib = _mm512_mask_mov_epi8(spread, NIB.high[odd], _mm512_srli_epi16(spread, 4));
  // (nib & 15) ^ 8: the low nibble, its sign bit flipped (q + 8)
  return _mm512_ternarylogic_epi32(nib, _mm512_set1_epi8(15), _mm512_set1_epi8(8), 0x6A);
}

// A run of 64 nibbles whose parity is known ahead (a dense or parent row's whole 64 columns): the byte mask, the
// spread and the high-nibble lanes hoisted out of the column loop.
struct Run {
  __mmask64 bytes;
  __m512i index;
  __mmask64 high;
  explicit Run(int64_t first) {
    const int odd = (int)(first & 1);
    bytes = _bzhi_u64(~(uint64_t)0, 32u + (unsigned)odd);
    index = _mm512_load_si512(NIB.index[odd]);
    high = NIB.high[odd];
  }
  __m512i at(const uint8_t* base, int64_t e) const {
    const __m512i spread = _mm512_permutexvar_epi8(index, _mm512_maskz_loadu_epi8(bytes, base + e / 2));
    const __m512i nib = _mm512_mask_mov_epi8(spread, high, _mm512_srli_epi16(spread, 4));
    return _mm512_ternarylogic_epi32(nib, _mm512_set1_epi8(15), _mm512_set1_epi8(8), 0x6A);
  }
};

// The scales of the group of each int32 lane of 64 columns (lane l: columns j + 4l ..): one masked load of the
// 64 / group scales the columns span (one, for groups of 64 or more) and a permute. `Scales` holds what does not
// change along a row; `last` loads only the unit's remaining groups (the lanes past `cols` get 0: their sums are 0).
struct Scales {
  int shift;
  int64_t groups;
  __mmask16 span;
  __m512i lane;
  explicit Scales(const FpwMatrix& w) {
    shift = __builtin_ctz((unsigned)w.group);
    groups = (w.cols + w.group - 1) >> shift;
    const int per = shift >= 6 ? 1 : 64 >> shift;
    span = (__mmask16)((1u << per) - 1);
    const __m512i l4 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60);
    lane = shift >= 6 ? _mm512_setzero_si512() : _mm512_srli_epi32(l4, shift);
  }
  template <bool WIDE>
  __m512 at(const float* unit, int64_t j) const {
    if (WIDE) return _mm512_set1_ps(unit[j >> shift]);  // a group of 64 columns or more: one broadcast load
    return _mm512_permutexvar_ps(lane, _mm512_maskz_loadu_ps(span, unit + (j >> shift)));
  }
  __m512 last(const float* unit, int64_t j) const {
    const int64_t g = j >> shift, left = groups - g;
    const __mmask16 m = left >= 16 ? span : (__mmask16)(span & ((1u << left) - 1));
    return _mm512_permutexvar_ps(lane, _mm512_maskz_loadu_ps(m, unit + g));
  }
};

// A bitmask row's values as q + 8 bytes, into `out` (count bytes, then 64 bytes of slack the loads may touch):
// the nibble stream decoded once per row, 64 at a time at the row's fixed parity, so the column loop reads
// bytes as the int8 kernel does (the per-64-columns decode of a variable, odd or even, start cost twice as much).
inline void decode_row(const uint8_t* values, int64_t e, int64_t count, uint8_t* out) {
  const Run run(e);
  int64_t t = 0;
  for (; t + 64 <= count; t += 64) _mm512_storeu_si512((void*)(out + t), run.at(values, e + t));
  if (t < count) _mm512_storeu_si512((void*)(out + t), nibbles_u8(values, e + t, count - t));
}

template <int R, int B, bool DENSE, bool WIDE>
inline void rows_q4(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* minus8,
                    const float* bias, float* y, int64_t ldy, int64_t r, uint8_t* scratch) {
  const int64_t n = w.cols;
  const Scales sc(w);
  const uint8_t* values = (const uint8_t*)w.values;
  const __m512i c8 = _mm512_set1_epi8(8);
  __m512 acc[R][B];
  int64_t e[R];
  const uint8_t* bp[R];
  const float* srow[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; i++) {
    e[i] = DENSE ? (r + i) * n : w.row_ptr[r + i];
    bp[i] = DENSE ? nullptr : w.bits + (r + i) * w.stride;
    srow[i] = w.scales + (r + i) * sc.groups;
    if (!DENSE) {  // the row's values decoded into its scratch bytes; e counts from there on
      decode_row(values, e[i], w.row_ptr[r + i + 1] - e[i], scratch + i * (n + 128));
      e[i] = 0;
    }
#pragma GCC unroll 4
    for (int b = 0; b < B; b++) acc[i][b] = _mm512_setzero_ps();
  }
  // dense rows: every row's parity is its first element's (a row's 64-column runs all start at that parity)
  const Run run(DENSE ? r * n : 0), run1(DENSE ? (r + 1) * n : 0);
  for (int64_t j = 0; j < n; j += 64) {
    const bool full = j + 64 <= n;
    __m512i xv[B], start[B];
#pragma GCC unroll 4
    for (int b = 0; b < B; b++) {
      xv[b] = _mm512_loadu_si512((const void*)(xq + b * ldxq + j));
      start[b] = _mm512_loadu_si512((const void*)(minus8 + b * (ldxq / 4) + j / 4));
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; i++) {
      __m512i wv;
      if (DENSE) {
        wv = full ? (i % 2 ? run1 : run).at(values, e[i] + j) : nibbles_u8(values, e[i] + j, n - j);
      } else {
        const uint64_t m = word_at(bp[i] + j / 8);
        const int64_t k = _mm_popcnt_u64(m);
        const uint8_t* row = scratch + i * (n + 128);
        wv = _mm512_mask_expand_epi8(c8, m, _mm512_loadu_si512((const void*)(row + e[i])));
        e[i] += k;
      }
      const __m512 sv = full ? sc.template at<WIDE>(srow[i], j) : sc.last(srow[i], j);
#pragma GCC unroll 4
      for (int b = 0; b < B; b++)
        acc[i][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start[b], wv, xv[b])), sv, acc[i][b]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; i++)
    for (int b = 0; b < B; b++)
      y[b * ldy + r + i] = _mm512_reduce_add_ps(acc[i][b]) * sx[b] + (bias ? bias[r + i] : 0.0f);
}

template <int R, int B, int A, bool WIDE>
inline void parents_q4(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* minus8,
                       const float* bias, float* y, int64_t ldy, int64_t i0) {
  constexpr int P = A <= 2 ? 1 : 2;
  const int64_t parents = w.rows / A, n = w.cols;
  const Scales sc(w);
  const __m512i c8 = _mm512_set1_epi8(8);
  const Run run(i0 * n), run1((i0 + 1) * n);
  __m512 acc[R][A][B];
#pragma GCC unroll 4
  for (int i = 0; i < R; i++)
#pragma GCC unroll 4
    for (int c = 0; c < A; c++)
#pragma GCC unroll 4
      for (int b = 0; b < B; b++) acc[i][c][b] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 64) {
    const bool full = j + 64 <= n;
    __m512i xv[B], start[B];
#pragma GCC unroll 4
    for (int b = 0; b < B; b++) {
      xv[b] = _mm512_loadu_si512((const void*)(xq + b * ldxq + j));
      start[b] = _mm512_loadu_si512((const void*)(minus8 + b * (ldxq / 4) + j / 4));
    }
#pragma GCC unroll 4
    for (int i = 0; i < R; i++) {
      const int64_t e = (i0 + i) * n + j;
      const __m512i pv = full ? (i % 2 ? run1 : run).at((const uint8_t*)w.values, e)
                              : nibbles_u8((const uint8_t*)w.values, e, n - j);
      uint64_t pb[P];
#pragma GCC unroll 2
      for (int k = 0; k < P; k++) pb[k] = word_at(w.bits + (k * parents + i0 + i) * w.stride + j / 8);
      const float* unit = w.scales + (i0 + i) * sc.groups;
      const __m512 sv = full ? sc.template at<WIDE>(unit, j) : sc.last(unit, j);
#pragma GCC unroll 4
      for (int c = 0; c < A; c++) {
        const __m512i wc = _mm512_mask_mov_epi8(c8, child_q8<A>(pb, c), pv);
#pragma GCC unroll 4
        for (int b = 0; b < B; b++)
          acc[i][c][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start[b], wc, xv[b])), sv, acc[i][c][b]);
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; i++)
    for (int c = 0; c < A; c++) {
      const int64_t row = (i0 + i) * A + c;
      for (int b = 0; b < B; b++)
        y[b * ldy + row] = _mm512_reduce_add_ps(acc[i][c][b]) * sx[b] + (bias ? bias[row] : 0.0f);
    }
}

template <int B, bool WIDE>
inline void range_q4(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* minus8,
                     const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  // rows per pass: 8 (dense and bitmask) for one or two inputs, else 2; parents 2 (alpha 2) or 1
  int64_t u = u0;
  if (w.format == FPW_PARENT) {
    switch (w.alpha) {
      case 2:
        for (; u + 2 <= u1; u += 2) parents_q4<2, B, 2, WIDE>(w, xq, ldxq, sx, minus8, bias, y, ldy, u);
        for (; u < u1; u++) parents_q4<1, B, 2, WIDE>(w, xq, ldxq, sx, minus8, bias, y, ldy, u);
        return;
      case 3:
        for (; u < u1; u++) parents_q4<1, B, 3, WIDE>(w, xq, ldxq, sx, minus8, bias, y, ldy, u);
        return;
      default:
        for (; u < u1; u++) parents_q4<1, B, 4, WIDE>(w, xq, ldxq, sx, minus8, bias, y, ldy, u);
        return;
    }
  }
  constexpr int R = B <= 2 ? 8 : 2;
  if (w.format == FPW_DENSE) {
    for (; u + R <= u1; u += R) rows_q4<R, B, true, WIDE>(w, xq, ldxq, sx, minus8, bias, y, ldy, u, nullptr);
    for (; u < u1; u++) rows_q4<1, B, true, WIDE>(w, xq, ldxq, sx, minus8, bias, y, ldy, u, nullptr);
    return;
  }
  // bitmask rows: R rows' values decoded to bytes at a time (R x (cols + 128) bytes: 32 KB at 4096 columns)
  uint8_t* scratch = new uint8_t[R * (w.cols + 128)];
  for (; u + R <= u1; u += R) rows_q4<R, B, false, WIDE>(w, xq, ldxq, sx, minus8, bias, y, ldy, u, scratch);
  for (; u < u1; u++) rows_q4<1, B, false, WIDE>(w, xq, ldxq, sx, minus8, bias, y, ldy, u, scratch);
  delete[] scratch;
}

template <int B>
inline void range_q4(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, const int32_t* minus8,
                     const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1) {
  if (w.group >= 64) return range_q4<B, true>(w, xq, ldxq, sx, minus8, bias, y, ldy, u0, u1);
  range_q4<B, false>(w, xq, ldxq, sx, minus8, bias, y, ldy, u0, u1);
}

// Per input, -8 times the sum of each four consecutive quantized inputs (ldxq / 4 int32s): each lane's start.
void minus8_sums(const int8_t* x, int64_t ldxq, int32_t* out) {
  const __m512i eights = _mm512_set1_epi8(8);
  for (int64_t j = 0; j < ldxq; j += 64) {
    const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), eights, _mm512_loadu_si512((const void*)(x + j)));
    _mm512_storeu_si512((void*)(out + j / 4), _mm512_sub_epi32(_mm512_setzero_si512(), s));
  }
}

void gemv_q4(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, int64_t batch, const float* bias,
             float* y, int64_t ldy, int64_t u0, int64_t u1) {
  int32_t* minus8 = new int32_t[4 * (ldxq / 4)];
  for (int64_t b0 = 0; b0 < batch; b0 += 4) {
    const int8_t* xb = xq + b0 * ldxq;
    float* yb = y + b0 * ldy;
    const int64_t nb = batch - b0 < 4 ? batch - b0 : 4;
    for (int64_t b = 0; b < nb; b++) minus8_sums(xb + b * ldxq, ldxq, minus8 + b * (ldxq / 4));
    switch (nb) {
      case 1: range_q4<1>(w, xb, ldxq, sx + b0, minus8, bias, yb, ldy, u0, u1); break;
      case 2: range_q4<2>(w, xb, ldxq, sx + b0, minus8, bias, yb, ldy, u0, u1); break;
      case 3: range_q4<3>(w, xb, ldxq, sx + b0, minus8, bias, yb, ldy, u0, u1); break;
      default: range_q4<4>(w, xb, ldxq, sx + b0, minus8, bias, yb, ldy, u0, u1); break;
    }
  }
  delete[] minus8;
}

void gemv_any(const FpwMatrix& w, const int8_t* xq, int64_t ldxq, const float* sx, int64_t batch, const float* bias,
              float* y, int64_t ldy, int64_t u0, int64_t u1) {
  if (w.dtype == FPW_I4) return gemv_q4(w, xq, ldxq, sx, batch, bias, y, ldy, u0, u1);
  // dense rows take 8 inputs per pass where 8 are left (two rows at a time: 16 accumulators), the other layouts 4
  // (the dense int8 Llama pair at 16 inputs: bench/results/quantized/llama_ffn_zen5_stream; bitmask rows, whose
  // expand the inputs share, ran no faster with 8)
  const bool eight = w.format == FPW_DENSE;
  for (int64_t b0 = 0, nb = 0; b0 < batch; b0 += nb) {
    const int8_t* xb = xq + b0 * ldxq;
    float* yb = y + b0 * ldy;
    nb = eight && batch - b0 >= 8 ? 8 : batch - b0 < 4 ? batch - b0 : 4;
    int32_t x128[8];
    for (int64_t b = 0; b < nb; b++) x128[b] = times128_sum(xb + b * ldxq, w.cols);
    switch (nb) {
      case 1: range_any<1>(w, xb, ldxq, sx + b0, x128, bias, yb, ldy, u0, u1); break;
      case 2: range_any<2>(w, xb, ldxq, sx + b0, x128, bias, yb, ldy, u0, u1); break;
      case 3: range_any<3>(w, xb, ldxq, sx + b0, x128, bias, yb, ldy, u0, u1); break;
      case 4: range_any<4>(w, xb, ldxq, sx + b0, x128, bias, yb, ldy, u0, u1); break;
      default: range_q8<8, true>(w, xb, ldxq, sx + b0, x128, bias, yb, ldy, u0, u1); break;  // nb = 8: dense
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
