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

// ---------------------------------------------------------------- few inputs: stream the weights once per BMAX

template <int R, int B, int DT>
inline void bitmask_rows(const FpwMatrix& w, const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                         int64_t r) {
  using reg = typename V::reg;
  using mask = typename V::mask;
  reg acc[R][B];
  int64_t p[R];
  const uint8_t* row[R];
  for (int i = 0; i < R; i++) {
    p[i] = w.row_ptr[r + i];
    row[i] = w.bits + (r + i) * w.stride;
    for (int b = 0; b < B; b++) acc[i][b] = V::zero();
  }
  const int64_t n = w.cols;
  int64_t j = 0;
  for (; j + V::W <= n; j += V::W) {
    reg xv[B];
    for (int b = 0; b < B; b++) xv[b] = V::load(x + b * ldx + j);
    for (int i = 0; i < R; i++) {
      const mask m = V::bits(row[i], j);
      const reg wv = V::expand(m, V::template values<DT>(w.values, p[i]));
      p[i] += V::count(m);
      for (int b = 0; b < B; b++) acc[i][b] = V::fma(wv, xv[b], acc[i][b]);
    }
  }
  if (j < n) {  // the row's last columns: mask bits past the row end are zero, inputs are loaded up to n only
    const int t = (int)(n - j);
    reg xv[B];
    for (int b = 0; b < B; b++) xv[b] = V::load_n(x + b * ldx + j, t);
    for (int i = 0; i < R; i++) {
      const mask m = V::bits(row[i], j);
      const reg wv = V::expand(m, V::template values<DT>(w.values, p[i]));
      for (int b = 0; b < B; b++) acc[i][b] = V::fma(wv, xv[b], acc[i][b]);
    }
  }
  for (int i = 0; i < R; i++)
    for (int b = 0; b < B; b++) y[b * ldy + r + i] = V::sum(acc[i][b]) + (bias ? bias[r + i] : 0.0f);
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
      const reg pv = V::template values<DT>(w.values, base[i] + j);
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
      const reg pv = V::template values<DT>(w.values, base[i] + j);
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
      for (int b = 0; b < B; b++) y[b * ldy + row] = V::sum(acc[i][c][b]) + (bias ? bias[row] : 0.0f);
    }
}

constexpr int rows_for(int acc_per_row) {
  return V::ACC / acc_per_row < 1 ? 1 : (V::ACC / acc_per_row > 8 ? 8 : V::ACC / acc_per_row);
}

template <int B, int DT>
inline void bitmask_range(const FpwMatrix& w, const float* x, int64_t ldx, const float* bias, float* y, int64_t ldy,
                          int64_t u0, int64_t u1) {
  constexpr int R = rows_for(B);
  int64_t r = u0;
  for (; r + R <= u1; r += R) bitmask_rows<R, B, DT>(w, x, ldx, bias, y, ldy, r);
  for (; r < u1; r++) bitmask_rows<1, B, DT>(w, x, ldx, bias, y, ldy, r);
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
  if (w.format == FPW_BITMASK) return bitmask_range<B, DT>(w, x, ldx, bias, y, ldy, u0, u1);
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
    case FPW_BF16: return gemv_dt<FPW_BF16>(*w, x, ldx, batch, bias, y, ldy, u0, u1);
    case FPW_F16: return gemv_dt<FPW_F16>(*w, x, ldx, batch, bias, y, ldy, u0, u1);
    default: return gemv_dt<FPW_F32>(*w, x, ldx, batch, bias, y, ldy, u0, u1);
  }
}

// ---------------------------------------------------------------- token batches: the batch in SIMD lanes

// One output row over one tile of the batch: for each non-zero (column j, value v), out += v * xt[j, tile].
// `K` registers of W lanes; `n` lanes used (K * W for a full tile). `val(idx)` reads the idx-th value, `word(k)`
// the k-th 64-bit mask word of the row.
template <int K, class Word, class Val>
inline void spmm_row(int64_t words, const Word& word, const Val& val, const float* xt, int64_t ldxt, int n, float b,
                     float* out) {
  using reg = typename V::reg;
  reg acc[K];
  for (int k = 0; k < K; k++) acc[k] = V::zero();
  const bool full = n == K * V::W;
  for (int64_t wi = 0; wi < words; wi++) {
    uint64_t m = word(wi);
    while (m) {
      const int64_t j = wi * 64 + __builtin_ctzll(m);
      m &= m - 1;
      const reg v = V::set1(val(j));
      const float* xr = xt + j * ldxt;
      if (full) {
        for (int k = 0; k < K; k++) acc[k] = V::fma(v, V::load(xr + k * V::W), acc[k]);
      } else {
        for (int k = 0; k < K; k++) {
          const int left = n - k * V::W;
          if (left <= 0) break;
          acc[k] = V::fma(v, left >= V::W ? V::load(xr + k * V::W) : V::load_n(xr + k * V::W, left), acc[k]);
        }
      }
    }
  }
  const reg bv = V::set1(b);
  for (int k = 0; k < K; k++) {
    const int left = n - k * V::W;
    if (left <= 0) break;
    const reg r = V::fma(V::set1(1.0f), acc[k], bv);
    if (left >= V::W)
      V::store(out + k * V::W, r);
    else
      V::store_n(out + k * V::W, r, left);
  }
}

template <int DT>
inline void spmm_dt(const FpwMatrix& w, const float* xt, int64_t ldxt, int64_t batch, const float* bias, float* yt,
                    int64_t ldyt, int64_t u0, int64_t u1) {
  constexpr int K = 4;
  const int64_t words = w.stride / 8, n = w.cols;
  for (int64_t t = 0; t < batch; t += K * V::W) {
    const int lanes = (int)min64(K * V::W, batch - t);
    if (w.format == FPW_BITMASK) {
      for (int64_t r = u0; r < u1; r++) {
        const uint8_t* row = w.bits + r * w.stride;
        const int64_t p0 = w.row_ptr[r];
        int64_t p = p0;
        auto word = [row](int64_t wi) { return word_at(row + wi * 8); };
        auto val = [&p, &w](int64_t) { return V::template scalar<DT>(w.values, p++); };
        spmm_row<K>(words, word, val, xt + t, ldxt, lanes, bias ? bias[r] : 0.0f, yt + r * ldyt + t);
      }
    } else {
      const int64_t parents = w.rows / w.alpha;
      const uint64_t last = (n % 64) ? ((uint64_t)1 << (n % 64)) - 1 : ~(uint64_t)0;
      const int64_t used = (n + 63) / 64;  // words holding columns
      for (int64_t i = u0; i < u1; i++) {
        const uint8_t* p0 = w.bits + i * w.stride;
        const uint8_t* p1 = w.planes > 1 ? w.bits + (parents + i) * w.stride : p0;
        const int64_t base = i * n;
        auto val = [base, &w](int64_t j) { return V::template scalar<DT>(w.values, base + j); };
        for (int c = 0; c < w.alpha; c++) {
          const int planes = w.planes;
          auto word = [=](int64_t wi) {
            const uint64_t a = word_at(p0 + wi * 8), b = word_at(p1 + wi * 8);
            uint64_t m = (c & 1) ? a : ~a;
            if (planes > 1) m &= (c & 2) ? b : ~b;
            return wi == used - 1 ? m & last : m;
          };
          const int64_t row = i * w.alpha + c;
          spmm_row<K>(used, word, val, xt + t, ldxt, lanes, bias ? bias[row] : 0.0f, yt + row * ldyt + t);
        }
      }
    }
  }
}

void spmm(const FpwMatrix* w, const float* xt, int64_t ldxt, int64_t batch, const float* bias, float* yt,
          int64_t ldyt, int64_t u0, int64_t u1) {
  switch (w->dtype) {
    case FPW_BF16: return spmm_dt<FPW_BF16>(*w, xt, ldxt, batch, bias, yt, ldyt, u0, u1);
    case FPW_F16: return spmm_dt<FPW_F16>(*w, xt, ldxt, batch, bias, yt, ldyt, u0, u1);
    default: return spmm_dt<FPW_F32>(*w, xt, ldxt, batch, bias, yt, ldyt, u0, u1);
  }
}

}  // namespace
