// The one template every ISA variant of the packed kernels is generated from (XNNPACK's rule: variants are never
// hand-copied, so a fix lands in all of them). An ISA file defines `V`, its vector traits, inside its own
// namespace, then includes this file there: each variant gets its own symbols and its own target flags.
//
// V provides: W (lanes), reg (W floats), mask (W bits), BMAX (inputs per weight pass), ACC (accumulators the
// register file holds); bits(row, j): the mask bits of columns j..j+W-1 (j % W == 0); tail(n): the first n lanes;
// count(m); zero(); set1(f); load(p); load_n(p, n): n < W lanes, the rest 0; values<DT>(base, i): W values from
// element i, widened to f32; scalar<DT>(base, i); expand(m, packed): the packed lanes spread to the lanes m sets,
// 0 elsewhere; fma(a, b, c) = a*b + c; mfma(m, a, b, c): a*b + c in the lanes of m, c elsewhere; sum(reg);
// store(p, r); store_n(p, r, n).
//
// Expects <stdint.h>, <string.h> and fpw_kernels.h included before the namespace is opened.

namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline uint64_t word_at(const uint8_t* p) {
  uint64_t w;
  memcpy(&w, p, 8);
  return w;
}

constexpr int value_bytes(int dt) { return dt == FPW_F32 ? 4 : dt == FPW_I8 ? 1 : 2; }

// The byte where element i lies (int4: two elements per byte).
template <int DT>
constexpr int64_t value_offset(int64_t i) {
  return DT == FPW_I4 ? i / 2 : i * value_bytes(DT);
}

// int4's scales: one per unit and group of 2^shift columns. A vector of W columns lies in one group (groups are
// powers of two >= 16 >= W), so each vector of values is scaled once as it is loaded.
struct Groups {
  int shift = 0;
  int64_t per_unit = 0;
};

template <int DT>
inline Groups groups_of(const FpwMatrix& w) {
  Groups g;
  if constexpr (DT == FPW_I4) {
    g.shift = __builtin_ctz((unsigned)w.group);
    g.per_unit = (w.cols + w.group - 1) >> g.shift;
  }
  return g;
}

// The values of columns j.. of `unit` as weights: int4's times their group's scale, others unchanged.
template <int DT>
inline typename V::reg group_scaled(const FpwMatrix& w, const Groups& g, int64_t unit, int64_t j, typename V::reg v) {
  if constexpr (DT == FPW_I4) return V::fma(v, V::set1(w.scales[unit * g.per_unit + (j >> g.shift)]), V::zero());
  return v;
}

// A unit's sums scaled to weights: int8 values are q (weight = q * scales[unit]); other types are the weights.
template <int DT>
inline float scaled(const FpwMatrix& w, int64_t unit, float sum) {
  if constexpr (DT == FPW_I8) return sum * w.scales[unit];
  return sum;
}

// ---------------------------------------------------------------- few inputs: stream the weights once per BMAX

// R rows of the bitmask layout, or (DENSE) of the dense one (int8 checkpoints keep rows with no zeros worth
// skipping that way), B inputs per pass.
template <int R, int B, int DT, bool DENSE>
inline void row_gemv(const FpwMatrix& w, const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                     int64_t r) {
  using reg = typename V::reg;
  using mask = typename V::mask;
  const int64_t n = w.cols;
  const Groups g = groups_of<DT>(w);
  reg acc[R][B];
  int64_t p[R];  // bitmask: the next value of each row; dense: each row's first value
  const uint8_t* row[R];
  for (int i = 0; i < R; i++) {
    p[i] = DENSE ? (r + i) * n : w.row_ptr[r + i];
    row[i] = DENSE ? nullptr : w.bits + (r + i) * w.stride;
    for (int b = 0; b < B; b++) acc[i][b] = V::zero();
  }
  int64_t j = 0;
  for (; j + V::W <= n; j += V::W) {
    reg xv[B];
    for (int b = 0; b < B; b++) xv[b] = V::load(x + b * ldx + j);
    for (int i = 0; i < R; i++) {
      reg wv;
      if constexpr (DENSE) {
        wv = V::template values<DT>(w.values, p[i] + j);
      } else {
        const mask m = V::bits(row[i], j);
        // R value streams at once outrun the hardware prefetcher: ask 128 values ahead (measured: 7.6 -> 7.1 ms at
        // 11008x4096, 50%, one thread; 64 to 128 ahead were best, 512 worse)
        __builtin_prefetch((const char*)w.values + value_offset<DT>(p[i] + 128));
        wv = V::expand(m, V::template values<DT>(w.values, p[i]));
        p[i] += V::count(m);
      }
      wv = group_scaled<DT>(w, g, r + i, j, wv);
      for (int b = 0; b < B; b++) acc[i][b] = V::fma(wv, xv[b], acc[i][b]);
    }
  }
  if (j < n) {  // the row's last columns: inputs are loaded up to n only, and the weights past the row's end kept
    const int t = (int)(n - j);  // out: bitmask bits past cols are zero, dense lanes are masked
    reg xv[B];
    for (int b = 0; b < B; b++) xv[b] = V::load_n(x + b * ldx + j, t);
    for (int i = 0; i < R; i++) {
      if constexpr (DENSE) {
        const reg wv = group_scaled<DT>(w, g, r + i, j, V::template values<DT>(w.values, p[i] + j));
        for (int b = 0; b < B; b++) acc[i][b] = V::mfma(V::tail(t), wv, xv[b], acc[i][b]);
      } else {
        const reg wv = V::expand(V::bits(row[i], j), V::template values<DT>(w.values, p[i]));
        const reg sv = group_scaled<DT>(w, g, r + i, j, wv);
        for (int b = 0; b < B; b++) acc[i][b] = V::fma(sv, xv[b], acc[i][b]);
      }
    }
  }
  for (int i = 0; i < R; i++)
    for (int b = 0; b < B; b++) y[b * ldy + r + i] = scaled<DT>(w, r + i, V::sum(acc[i][b])) + (bias ? bias[r + i] : 0.0f);
}

template <int A>
inline typename V::mask child_mask(const typename V::mask* planes, int c) {
  if (A <= 2) return c ? planes[0] : (typename V::mask)~planes[0];
  typename V::mask m0 = (c & 1) ? planes[0] : (typename V::mask)~planes[0];
  typename V::mask m1 = (c & 2) ? planes[1] : (typename V::mask)~planes[1];
  return (typename V::mask)(m0 & m1);
}

template <int R, int B, int DT, int A>
inline void parent_rows(const FpwMatrix& w, const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                        int64_t i0) {
  using reg = typename V::reg;
  using mask = typename V::mask;
  constexpr int P = A <= 2 ? 1 : 2;
  const int64_t parents = w.rows / A, n = w.cols;
  const Groups g = groups_of<DT>(w);
  reg acc[R][A][B];
  const uint8_t* pl[R][P];
  int64_t base[R];
  for (int i = 0; i < R; i++) {
    base[i] = (i0 + i) * n;
    for (int k = 0; k < P; k++) pl[i][k] = w.bits + (k * parents + i0 + i) * w.stride;
    for (int c = 0; c < A; c++)
      for (int b = 0; b < B; b++) acc[i][c][b] = V::zero();
  }
  int64_t j = 0;
  for (; j + V::W <= n; j += V::W) {
    reg xv[B];
    for (int b = 0; b < B; b++) xv[b] = V::load(x + b * ldx + j);
    for (int i = 0; i < R; i++) {
      const reg pv = group_scaled<DT>(w, g, i0 + i, j, V::template values<DT>(w.values, base[i] + j));
      mask pb[P];
      for (int k = 0; k < P; k++) pb[k] = V::bits(pl[i][k], j);
      for (int c = 0; c < A; c++) {
        const mask mc = child_mask<A>(pb, c);
        for (int b = 0; b < B; b++) acc[i][c][b] = V::mfma(mc, pv, xv[b], acc[i][c][b]);
      }
    }
  }
  if (j < n) {
    const int t = (int)(n - j);
    const mask valid = V::tail(t);
    reg xv[B];
    for (int b = 0; b < B; b++) xv[b] = V::load_n(x + b * ldx + j, t);
    for (int i = 0; i < R; i++) {
      const reg pv = group_scaled<DT>(w, g, i0 + i, j, V::template values<DT>(w.values, base[i] + j));
      mask pb[P];
      for (int k = 0; k < P; k++) pb[k] = V::bits(pl[i][k], j);
      for (int c = 0; c < A; c++) {
        const mask mc = (mask)(child_mask<A>(pb, c) & valid);
        for (int b = 0; b < B; b++) acc[i][c][b] = V::mfma(mc, pv, xv[b], acc[i][c][b]);
      }
    }
  }
  for (int i = 0; i < R; i++)
    for (int c = 0; c < A; c++) {
      const int64_t row = (i0 + i) * A + c;
      for (int b = 0; b < B; b++) y[b * ldy + row] = scaled<DT>(w, i0 + i, V::sum(acc[i][c][b])) + (bias ? bias[row] : 0.0f);
    }
}

constexpr int rows_for(int acc_per_row) {
  return V::ACC / acc_per_row < 1 ? 1 : (V::ACC / acc_per_row > 8 ? 8 : V::ACC / acc_per_row);
}

template <int B, int DT, bool DENSE>
inline void row_range(const FpwMatrix& w, const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                      int64_t u0, int64_t u1) {
  constexpr int R = rows_for(B);
  int64_t r = u0;
  for (; r + R <= u1; r += R) row_gemv<R, B, DT, DENSE>(w, x, ldx, bias, y, ldy, r);
  for (; r < u1; r++) row_gemv<1, B, DT, DENSE>(w, x, ldx, bias, y, ldy, r);
}

template <int B, int DT, int A>
inline void parent_range(const FpwMatrix& w, const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                         int64_t u0, int64_t u1) {
  constexpr int R = rows_for(A * B) > 4 ? 4 : rows_for(A * B);
  int64_t i = u0;
  for (; i + R <= u1; i += R) parent_rows<R, B, DT, A>(w, x, ldx, bias, y, ldy, i);
  for (; i < u1; i++) parent_rows<1, B, DT, A>(w, x, ldx, bias, y, ldy, i);
}

template <int B, int DT>
inline void range_of(const FpwMatrix& w, const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                     int64_t u0, int64_t u1) {
  if (w.format == FPW_BITMASK) return row_range<B, DT, false>(w, x, ldx, bias, y, ldy, u0, u1);
  if (w.format == FPW_DENSE) return row_range<B, DT, true>(w, x, ldx, bias, y, ldy, u0, u1);
  switch (w.alpha) {
    case 2: return parent_range<B, DT, 2>(w, x, ldx, bias, y, ldy, u0, u1);
    case 3: return parent_range<B, DT, 3>(w, x, ldx, bias, y, ldy, u0, u1);
    default: return parent_range<B, DT, 4>(w, x, ldx, bias, y, ldy, u0, u1);
  }
}

template <int DT>
inline void gemv_dt(const FpwMatrix& w, const float* x, int64_t ldx, int64_t batch, const float* bias, float* y,
                    int64_t ldy, int64_t u0, int64_t u1) {
  // parents hold A accumulators per input: at most 4 inputs per pass there
  const int64_t bmax = w.format == FPW_PARENT && V::BMAX > 4 ? 4 : V::BMAX;
  for (int64_t b0 = 0; b0 < batch; b0 += bmax) {
    const float* xb = x + b0 * ldx;
    float* yb = y + b0 * ldy;
    switch (min64(bmax, batch - b0)) {
      case 1: range_of<1, DT>(w, xb, ldx, bias, yb, ldy, u0, u1); break;
      case 2: range_of<2, DT>(w, xb, ldx, bias, yb, ldy, u0, u1); break;
      case 3: range_of<V::BMAX >= 3 ? 3 : 1, DT>(w, xb, ldx, bias, yb, ldy, u0, u1); break;
      case 4: range_of<V::BMAX >= 4 ? 4 : 1, DT>(w, xb, ldx, bias, yb, ldy, u0, u1); break;
      case 5: range_of<V::BMAX >= 5 ? 5 : 1, DT>(w, xb, ldx, bias, yb, ldy, u0, u1); break;
      case 6: range_of<V::BMAX >= 6 ? 6 : 1, DT>(w, xb, ldx, bias, yb, ldy, u0, u1); break;
      case 7: range_of<V::BMAX >= 7 ? 7 : 1, DT>(w, xb, ldx, bias, yb, ldy, u0, u1); break;
      default: range_of<V::BMAX >= 8 ? 8 : 1, DT>(w, xb, ldx, bias, yb, ldy, u0, u1); break;
    }
  }
}

void gemv(const FpwMatrix* w, const float* x, int64_t ldx, int64_t batch, const float* bias, float* y, int64_t ldy,
          int64_t u0, int64_t u1) {
  switch (w->dtype) {
    case FPW_I8: return gemv_dt<FPW_I8>(*w, x, ldx, batch, bias, y, ldy, u0, u1);
    case FPW_I4: return gemv_dt<FPW_I4>(*w, x, ldx, batch, bias, y, ldy, u0, u1);
    case FPW_BF16: return gemv_dt<FPW_BF16>(*w, x, ldx, batch, bias, y, ldy, u0, u1);
    case FPW_F16: return gemv_dt<FPW_F16>(*w, x, ldx, batch, bias, y, ldy, u0, u1);
    default: return gemv_dt<FPW_F32>(*w, x, ldx, batch, bias, y, ldy, u0, u1);
  }
}

// ---------------------------------------------------------------- token batches: the batch in SIMD lanes

// The inputs transposed (xt: cols rows of ldxt lanes, ldxt a multiple of W, zero-padded), the outputs likewise.
// Columns are taken in blocks of 64 (one mask word) so the block of xt a row reads stays in L1, and a row's
// partial sums (K registers) are added to yt block by block. Per non-zero: one broadcast and K multiply-adds on
// lanes of K·W inputs; two sets of accumulators alternate non-zeros so the multiply-adds' latency is hidden.

constexpr int64_t SPMM_ROWS = 16;
constexpr int64_t SPMM_COLS = 1024;

// One output row's partial sums over one 64-column block. PARENT: the value of column j is values[base + j] (the
// parent's dense row); otherwise the set bits' values follow one another from values[base]. Everything is a
// local, so the value index and the sums stay in registers (a lambda capturing the index by reference kept it in
// memory: a store-to-load chain per non-zero). Not inlined: inlined into the block loops, gcc spilled the value
// index and the input stride to the stack inside this loop (a read-modify-write per non-zero); and the two loops
// are written apart, since with one loop gcc stored all K sums to the stack at every non-zero.
// int4: `gs` the scales of the word's first column's group and those after it, `jshift` log2 of the group
// capped at 6 (a group of 64 columns or more holds the whole word: column j's scale is gs[j >> 6] = gs[0]).
template <int K, int DT, bool PARENT>
__attribute__((noinline)) int64_t spmm_word(uint64_t m, const void* values, int64_t base, const float* xb, int64_t ldxt,
                                            float* out, float s, const float* gs, int jshift) {
  using reg = typename V::reg;
  // int8: each value times its unit's scale as it is broadcast (the sums go to yt block by block); one product;
  // int4: times its group's scale
  auto value = [&](int64_t i, int j) {
    if constexpr (DT == FPW_I8) return V::template scalar<DT>(values, i) * s;
    if constexpr (DT == FPW_I4) return V::template scalar<DT>(values, i) * gs[j >> jshift];
    return V::template scalar<DT>(values, i);
  };
  if (!m) return base;
  int64_t q = base;
  reg a[K];
  for (int k = 0; k < K; k++) a[k] = V::load(out + k * V::W);
  if constexpr (K >= 4) {  // K registers are chains enough to hide a multiply-add's latency
    while (m) {
      const int j = __builtin_ctzll(m);
      m &= m - 1;
      const reg v = V::set1(value(PARENT ? base + j : q++, j));
      const float* xr = xb + j * ldxt;
      for (int k = 0; k < K; k++) a[k] = V::fma(v, V::load(xr + k * V::W), a[k]);
    }
    for (int k = 0; k < K; k++) V::store(out + k * V::W, a[k]);
  } else {  // fewer: alternate non-zeros between two sets of sums
    reg b[K];
    for (int k = 0; k < K; k++) b[k] = V::zero();
    while (m) {
      int j = __builtin_ctzll(m);
      m &= m - 1;
      reg v = V::set1(value(PARENT ? base + j : q++, j));
      const float* xr = xb + j * ldxt;
      for (int k = 0; k < K; k++) a[k] = V::fma(v, V::load(xr + k * V::W), a[k]);
      if (!m) break;
      j = __builtin_ctzll(m);
      m &= m - 1;
      v = V::set1(value(PARENT ? base + j : q++, j));
      xr = xb + j * ldxt;
      for (int k = 0; k < K; k++) b[k] = V::fma(v, V::load(xr + k * V::W), b[k]);
    }
    for (int k = 0; k < K; k++) V::store(out + k * V::W, V::fma(V::set1(1.0f), a[k], b[k]));
  }
  return q;
}

// Rows [u0, u1) over the column words [w0, w1): partial sums added into yt, `next` the value index each bitmask row
// has reached.
template <int K, int DT>
inline void spmm_block(const FpwMatrix& w, const float* xt, int64_t ldxt, float* yt, int64_t ldyt, int64_t u0,
                       int64_t u1, int64_t w0, int64_t w1, int64_t* next) {
  const int64_t n = w.cols, words = (n + 63) / 64;
  const uint64_t last = (n % 64) ? ((uint64_t)1 << (n % 64)) - 1 : ~(uint64_t)0;
  const Groups g = groups_of<DT>(w);
  const int jshift = g.shift < 6 ? g.shift : 6;
  // int4: the scales of unit u's groups from the word's first column on (nothing for other types)
  auto gs = [&](int64_t u, int64_t wi) -> const float* {
    if constexpr (DT == FPW_I4) return w.scales + u * g.per_unit + ((wi * 64) >> g.shift);
    return nullptr;
  };
  for (int64_t wi = w0; wi < w1; wi++) {
    const float* xb = xt + wi * 64 * ldxt;
    if (w.format == FPW_BITMASK) {
      for (int64_t r = u0; r < u1; r++) {
        const uint64_t m = word_at(w.bits + r * w.stride + wi * 8);
        next[r] = spmm_word<K, DT, false>(m, w.values, next[r], xb, ldxt, yt + r * ldyt, scaled<DT>(w, r, 1.0f),
                                          gs(r, wi), jshift);
      }
    } else if (w.format == FPW_DENSE) {
      const uint64_t m = wi == words - 1 ? last : ~(uint64_t)0;
      for (int64_t r = u0; r < u1; r++)
        spmm_word<K, DT, true>(m, w.values, r * n + wi * 64, xb, ldxt, yt + r * ldyt, scaled<DT>(w, r, 1.0f),
                               gs(r, wi), jshift);
    } else {
      const int64_t parents = w.rows / w.alpha;
      for (int64_t i = u0; i < u1; i++) {
        const uint64_t a = word_at(w.bits + i * w.stride + wi * 8);
        const uint64_t b = w.planes > 1 ? word_at(w.bits + (parents + i) * w.stride + wi * 8) : 0;
        for (int c = 0; c < w.alpha; c++) {
          uint64_t m = (c & 1) ? a : ~a;
          if (w.planes > 1) m &= (c & 2) ? b : ~b;
          if (wi == words - 1) m &= last;
          spmm_word<K, DT, true>(m, w.values, i * n + wi * 64, xb, ldxt, yt + (i * w.alpha + c) * ldyt,
                                 scaled<DT>(w, i, 1.0f), gs(i, wi), jshift);
        }
      }
    }
  }
}

// Blocked three ways so every operand stays in cache: SPMM_COLS columns of xt (K·W lanes each) stay in L2 while
// all rows pass; within them, SPMM_ROWS rows' sums stay in L1 while 64 columns (one mask word) of xt, also in
// L1, stream past. Measured at 11008x4096, 50%, 128 lanes: without the column blocks xt (2 MiB) spilled from L2.
template <int K, int DT>
inline void spmm_tile(const FpwMatrix& w, const float* xt, int64_t ldxt, const float* bias, float* yt, int64_t ldyt,
                      int64_t u0, int64_t u1) {
  const int64_t A = w.format == FPW_PARENT ? w.alpha : 1;
  const int64_t words = (w.cols + 63) / 64;
  for (int64_t r = u0 * A; r < u1 * A; r++) {  // every output row starts at its bias
    const typename V::reg b = V::set1(bias ? bias[r] : 0.0f);
    for (int k = 0; k < K; k++) V::store(yt + r * ldyt + k * V::W, b);
  }
  int64_t* next = new int64_t[w.format == FPW_BITMASK ? w.rows : 1];
  if (w.format == FPW_BITMASK)
    for (int64_t r = u0; r < u1; r++) next[r] = w.row_ptr[r];
  for (int64_t w0 = 0; w0 < words; w0 += SPMM_COLS / 64) {
    const int64_t w1 = min64(w0 + SPMM_COLS / 64, words);
    for (int64_t r = u0; r < u1; r += SPMM_ROWS)
      spmm_block<K, DT>(w, xt, ldxt, yt, ldyt, r, min64(r + SPMM_ROWS, u1), w0, w1, next);
  }
  delete[] next;
}

template <int DT>
inline void spmm_dt(const FpwMatrix& w, const float* xt, int64_t ldxt, int64_t batch, const float* bias, float* yt,
                    int64_t ldyt, int64_t u0, int64_t u1) {
  constexpr int KMAX = 8;
  for (int64_t t = 0; t < batch; t += KMAX * V::W) {
    const int64_t regs = (min64(KMAX * V::W, batch - t) + V::W - 1) / V::W;
    const float* x = xt + t;
    float* y = yt + t;
    switch (regs) {
      case 1: spmm_tile<1, DT>(w, x, ldxt, bias, y, ldyt, u0, u1); break;
      case 2: spmm_tile<2, DT>(w, x, ldxt, bias, y, ldyt, u0, u1); break;
      case 3: spmm_tile<3, DT>(w, x, ldxt, bias, y, ldyt, u0, u1); break;
      case 4: spmm_tile<4, DT>(w, x, ldxt, bias, y, ldyt, u0, u1); break;
      case 5: spmm_tile<5, DT>(w, x, ldxt, bias, y, ldyt, u0, u1); break;
      case 6: spmm_tile<6, DT>(w, x, ldxt, bias, y, ldyt, u0, u1); break;
      case 7: spmm_tile<7, DT>(w, x, ldxt, bias, y, ldyt, u0, u1); break;
      default: spmm_tile<8, DT>(w, x, ldxt, bias, y, ldyt, u0, u1); break;
    }
  }
}

// ---------------------------------------------------------------- unpack to dense f32 (the unpack-and-GEMM mode)

template <int DT>
inline void unpack_dt(const FpwMatrix& w, float* dense, int64_t u0, int64_t u1) {
  using reg = typename V::reg;
  const int64_t n = w.cols;
  const reg zero = V::zero();
  const Groups g = groups_of<DT>(w);
  if (w.format == FPW_BITMASK) {
    for (int64_t r = u0; r < u1; r++) {
      const uint8_t* row = w.bits + r * w.stride;
      int64_t p = w.row_ptr[r];
      float* out = dense + r * n;
      const reg s = V::set1(scaled<DT>(w, r, 1.0f));  // x 1 is exact: other types come out unchanged
      int64_t j = 0;
      for (; j + V::W <= n; j += V::W) {
        const typename V::mask m = V::bits(row, j);
        const reg v = group_scaled<DT>(w, g, r, j, V::expand(m, V::template values<DT>(w.values, p)));
        V::store(out + j, V::fma(v, s, zero));
        p += V::count(m);
      }
      if (j < n) {
        const reg v = group_scaled<DT>(w, g, r, j, V::expand(V::bits(row, j), V::template values<DT>(w.values, p)));
        V::store_n(out + j, V::fma(v, s, zero), (int)(n - j));
      }
    }
    return;
  }
  if (w.format == FPW_DENSE) {
    for (int64_t r = u0; r < u1; r++) {
      const reg s = V::set1(scaled<DT>(w, r, 1.0f));
      float* out = dense + r * n;
      int64_t j = 0;
      for (; j + V::W <= n; j += V::W)
        V::store(out + j, V::fma(group_scaled<DT>(w, g, r, j, V::template values<DT>(w.values, r * n + j)), s, zero));
      if (j < n)
        V::store_n(out + j, V::fma(group_scaled<DT>(w, g, r, j, V::template values<DT>(w.values, r * n + j)), s, zero),
                   (int)(n - j));
    }
    return;
  }
  const int64_t parents = w.rows / w.alpha;
  for (int64_t i = u0; i < u1; i++) {
    const reg one = V::set1(scaled<DT>(w, i, 1.0f));
    const uint8_t* p0 = w.bits + i * w.stride;
    const uint8_t* p1 = w.bits + (parents + i) * w.stride;
    for (int64_t j = 0; j < n; j += V::W) {
      const typename V::reg pv = group_scaled<DT>(w, g, i, j, V::template values<DT>(w.values, i * n + j));
      typename V::mask pb[2] = {V::bits(p0, j), w.planes > 1 ? V::bits(p1, j) : (typename V::mask)0};
      for (int c = 0; c < w.alpha; c++) {
        typename V::mask mc = w.planes > 1 ? child_mask<4>(pb, c) : child_mask<2>(pb, c);
        const typename V::reg v = V::mfma(mc, pv, one, zero);
        float* out = dense + (i * w.alpha + c) * n + j;
        if (j + V::W <= n)
          V::store(out, v);
        else
          V::store_n(out, v, (int)(n - j));
      }
    }
  }
}

void unpack(const FpwMatrix* w, float* dense, int64_t u0, int64_t u1) {
  switch (w->dtype) {
    case FPW_I8: return unpack_dt<FPW_I8>(*w, dense, u0, u1);
    case FPW_I4: return unpack_dt<FPW_I4>(*w, dense, u0, u1);
    case FPW_BF16: return unpack_dt<FPW_BF16>(*w, dense, u0, u1);
    case FPW_F16: return unpack_dt<FPW_F16>(*w, dense, u0, u1);
    default: return unpack_dt<FPW_F32>(*w, dense, u0, u1);
  }
}

void spmm(const FpwMatrix* w, const float* xt, int64_t ldxt, int64_t batch, const float* bias, float* yt,
          int64_t ldyt, int64_t u0, int64_t u1) {
  switch (w->dtype) {
    case FPW_I8: return spmm_dt<FPW_I8>(*w, xt, ldxt, batch, bias, yt, ldyt, u0, u1);
    case FPW_I4: return spmm_dt<FPW_I4>(*w, xt, ldxt, batch, bias, yt, ldyt, u0, u1);
    case FPW_BF16: return spmm_dt<FPW_BF16>(*w, xt, ldxt, batch, bias, yt, ldyt, u0, u1);
    case FPW_F16: return spmm_dt<FPW_F16>(*w, xt, ldxt, batch, bias, yt, ldyt, u0, u1);
    default: return spmm_dt<FPW_F32>(*w, xt, ldxt, batch, bias, yt, ldyt, u0, u1);
  }
}

}  // namespace
