// libFuzzer harnesses over the packed kernels' C entry points (fpw_kernels.h), built with AddressSanitizer and
// UndefinedBehaviorSanitizer by fpewiden/packed/fuzz.py; fpewiden/packed/fuzz.py also writes the seed inputs
// from real packed matrices, in the two layouts below. Two targets, chosen at compile time:
//
// FPW_FUZZ_RAW: bytes -> a matrix exactly as a file could describe it (every field and array length taken from
//   the input, arrays filled from it) -> fpw_validate -> on success gemv, spmm and unpack on every ISA this CPU
//   runs, and fpw_unpack. Finds what the validator lets through that a kernel reads or writes out of bounds.
//   Layout (little-endian): u8 format, u8 dtype, u16 rows, u16 cols, u16 stride, i8 alpha, i8 planes,
//   u8 batch, u8 group (int4's columns per scale: 0, a power of two or not), u16 value bytes, u16 bit bytes,
//   u16 row offsets, then the arrays' bytes in that order, then u16 scales and their floats (short input: zeros).
//
// FPW_FUZZ_KERNELS: bytes -> a consistent matrix of any format and value type (sparsity from the input, row
//   offsets derived, small integer values so every sum is exact), optionally one corruption chosen by the input
//   -> fpw_validate -> on success every ISA's gemv (1..10 inputs), spmm (9..128 lanes) and unpack, which must equal
//   the reference (fpw_unpack and a double-precision product) exactly. An uncorrupted matrix the validator refuses,
//   or any difference, is a finding (abort).
//   Layout: u8 kind (bit 0 parent, else bit 5 dense, else bitmask; bits 1-2 dtype, int8 made int4 by bit 7;
//   bits 3-4 alpha - 2; int8 and int4 scales are powers of two from bits 6-7, so every product stays exact; int4's
//   group 16, 32 or 64 from the units), u8 units, u8 cols, u8 gemv inputs,
//   u8 spmm lanes (each mapped to a range below), u8 corruption, u8 its argument, then bit bytes (stride per row or plane row) and value bytes.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmath>
#include <vector>

#include "../fpw_kernels.h"

namespace {

struct Reader {
  const uint8_t* p;
  size_t n, at = 0;
  uint8_t u8() { return at < n ? p[at++] : 0; }
  uint16_t u16() { return (uint16_t)(u8() | (u8() << 8)); }
  void fill(void* dst, size_t bytes) {
    if (bytes == 0) return;  // an empty array may have no storage at all
    const size_t k = at < n ? (n - at < bytes ? n - at : bytes) : 0;
    if (k) memcpy(dst, p + at, k);
    memset((uint8_t*)dst + k, 0, bytes - k);
    at += k;
  }
};

const char* const ISAS[] = {"portable", "avx2", "avx512"};

// Heap arrays of exactly the given size, so AddressSanitizer reports a kernel's first byte past them.
template <typename T>
T* exact(size_t count) {
  return (T*)malloc(count ? count * sizeof(T) : 1);
}

// Every kernel of every ISA this CPU runs on `w`, into buffers of exactly the sizes the bindings use; `out`
// collects (when given) each ISA's gemv, spmm and unpack results for the caller to compare.
void run_all(const FpwMatrix& w, int64_t gemv_batch, int64_t spmm_batch, const float* x_src, const float* bias,
             std::vector<std::vector<float>>* out) {
  const int64_t units = w.format == FPW_PARENT ? w.rows / w.alpha : w.rows;
  const int64_t ld = (spmm_batch + 15) / 16 * 16;
  float* x = exact<float>(gemv_batch * w.cols);
  float* y = exact<float>(gemv_batch * w.rows);
  float* xt = exact<float>(w.cols * ld);
  float* yt = exact<float>(w.rows * ld);
  float* dense = exact<float>(w.rows * w.cols);
  memcpy(x, x_src, sizeof(float) * gemv_batch * w.cols);
  memset(xt, 0, sizeof(float) * w.cols * ld);
  for (int64_t b = 0; b < spmm_batch; b++)
    for (int64_t j = 0; j < w.cols; j++) xt[j * ld + b] = x_src[(b % gemv_batch) * w.cols + j];
  for (const char* isa : ISAS) {
    const FpwKernels* k = fpw_select(isa);
    if (k == nullptr) continue;
    const int64_t half = units / 2;  // two ranges, as threads split the work
    k->gemv(&w, x, w.cols, gemv_batch, bias, y, w.rows, 0, half);
    k->gemv(&w, x, w.cols, gemv_batch, bias, y, w.rows, half, units);
    k->spmm(&w, xt, ld, spmm_batch, bias, yt, ld, 0, half);
    k->spmm(&w, xt, ld, spmm_batch, bias, yt, ld, half, units);
    k->unpack(&w, dense, 0, units);
    if (out) {
      out->emplace_back(y, y + gemv_batch * w.rows);
      std::vector<float> s;
      for (int64_t r = 0; r < w.rows; r++)
        for (int64_t b = 0; b < spmm_batch; b++) s.push_back(yt[r * ld + b]);
      out->push_back(s);
      out->emplace_back(dense, dense + w.rows * w.cols);
    }
  }
  // int8 activations: every int8-input kernel this CPU runs (VNNI; AVX2 for int8 values), for its reads and writes;
  // their sums are exact and scaled alike, so where both run they must agree bit for bit (vs the reference they
  // differ by the inputs' rounding, not compared here)
  if ((w.dtype == FPW_I8 || w.dtype == FPW_I4) && w.cols <= FPW_Q8_MAX_COLS) {
    const int64_t ldq = (w.cols + 63) / 64 * 64;
    int8_t* xq = exact<int8_t>(gemv_batch * ldq);
    float* sx = exact<float>(gemv_batch);
    fpw_quantize_inputs(x, w.cols, gemv_batch, w.cols, xq, ldq, sx);
    std::vector<std::vector<float>> q8_out;
    for (const char* isa : {"avx512", "avx2"}) {
      const FpwGemvQ8 k8 = fpw_select_q8_for(isa, w.dtype);
      if (!k8) continue;
      k8(&w, xq, ldq, sx, gemv_batch, bias, y, w.rows, 0, units / 2);
      k8(&w, xq, ldq, sx, gemv_batch, bias, y, w.rows, units / 2, units);
      q8_out.emplace_back(y, y + gemv_batch * w.rows);
    }
    if (q8_out.size() == 2 && memcmp(q8_out[0].data(), q8_out[1].data(), q8_out[0].size() * sizeof(float)) != 0)
      __builtin_trap();  // the AVX2 and VNNI int8-input kernels disagree
    free(xq);
    free(sx);
  }
  const FpwGemvQ8 q8 = fpw_select_q8();
  if (q8 && w.dtype == FPW_I8) {
    // the int8 rows torch's int8 GEMM multiplies: q * scale is the reference unpack's value, exactly (the
    // reference computes the same product; a raw matrix's infinite or NaN scales are left out)
    int8_t* q = exact<int8_t>(w.rows * w.cols);
    fpw_unpack_q8_avx512vnni(&w, q, 0, units / 2);
    fpw_unpack_q8_avx512vnni(&w, q, units / 2, units);
    fpw_unpack(&w, dense, 0, units);
    for (int64_t r = 0; r < w.rows; r++) {
      const float s = w.scales[w.format == FPW_PARENT ? r / w.alpha : r];
      for (int64_t j = 0; j < w.cols; j++) {
        const int8_t v = q[r * w.cols + j];
        const float want = dense[r * w.cols + j];  // a skipped weight is 0 there, whatever its scale
        if (std::isfinite(want) && (v == 0 ? want != 0.0f : want != (float)v * s)) __builtin_trap();
      }
    }
    free(q);
  }
  // the dense layout's values a bitmask matrix of int8 or int4 values is spread to (fpw_runs_spread), in two
  // ranges as threads split it where rows own their bytes: every weight the stored matrix's (a raw matrix's
  // infinite or NaN scales left out: 0 times one is not 0)
  if (w.format == FPW_BITMASK && (w.dtype == FPW_I8 || w.dtype == FPW_I4)) {
    uint8_t* spread = exact<uint8_t>((size_t)fpw_spread_bytes(&w));
    if (w.dtype == FPW_I8 || w.cols % 2 == 0) {
      fpw_spread(&w, spread, 0, units / 2);
      fpw_spread(&w, spread, units / 2, units);
    } else {
      fpw_spread(&w, spread, 0, units);
    }
    FpwMatrix d = w;
    d.format = FPW_DENSE, d.values = spread, d.bits = nullptr, d.row_ptr = nullptr, d.stride = 0, d.alpha = 1;
    d.planes = 0;
    float* got = exact<float>(w.rows * w.cols);
    fpw_unpack(&d, got, 0, units);
    fpw_unpack(&w, dense, 0, units);
    const int64_t groups = w.dtype == FPW_I4 ? (w.cols + w.group - 1) / w.group : 1;
    for (int64_t r = 0; r < w.rows; r++)
      for (int64_t j = 0; j < w.cols; j++)
        if (std::isfinite(w.scales[r * groups + j / (w.dtype == FPW_I4 ? w.group : w.cols)]) &&
            got[r * w.cols + j] != dense[r * w.cols + j])
          __builtin_trap();  // the spread values are not the stored matrix
    free(got);
    free(spread);
  }
  fpw_unpack(&w, dense, 0, units);
  free(x);
  free(y);
  free(xt);
  free(yt);
  free(dense);
}

int raw(const uint8_t* data, size_t size) {
  Reader in{data, size};
  FpwMatrix w{};
  w.format = (int8_t)in.u8();
  w.dtype = (int8_t)in.u8();
  w.rows = in.u16();
  w.cols = in.u16();
  w.stride = in.u16();
  w.alpha = (int8_t)in.u8();
  w.planes = (int8_t)in.u8();
  const int64_t batch = 1 + in.u8() % 24;
  const uint8_t g = in.u8();
  w.group = g == 0 ? 0 : g & 1 ? 1 << (g % 21) : g;
  const size_t value_bytes = in.u16(), bit_bytes = in.u16(), offsets = in.u16();
  const int64_t value_size = w.dtype == FPW_F32 ? 4 : w.dtype == FPW_I8 || w.dtype == FPW_I4 ? 1 : 2;
  uint8_t* values = exact<uint8_t>(value_bytes);
  uint8_t* bits = exact<uint8_t>(bit_bytes);
  int64_t* row_ptr = offsets ? exact<int64_t>(offsets) : nullptr;
  in.fill(values, value_bytes);
  in.fill(bits, bit_bytes);
  if (row_ptr) in.fill(row_ptr, offsets * sizeof(int64_t));
  const size_t scale_count = in.u16();
  float* scales = scale_count ? exact<float>(scale_count) : nullptr;
  if (scales) in.fill(scales, scale_count * sizeof(float));
  w.values = values;
  w.bits = bits;
  w.row_ptr = row_ptr;
  w.scales = scales;
  const FpwSizes sizes{(int64_t)(value_bytes / value_size), value_size, (int64_t)bit_bytes, (int64_t)offsets,
                       (int64_t)scale_count};
  if (value_bytes % value_size == 0 && fpw_validate(&w, &sizes) == nullptr) {
    std::vector<float> x(batch * w.cols, 1.0f), bias(w.rows, 0.5f);
    run_all(w, batch, batch + 8, x.data(), bias.data(), nullptr);
  }
  free(values);
  free(bits);
  free(row_ptr);
  free(scales);
  return 0;
}

uint16_t half_of(float f, int dtype) {  // exact for the small integers this harness uses
  uint32_t u;
  memcpy(&u, &f, 4);
  if (dtype == FPW_BF16) return (uint16_t)(u >> 16);
  if (f == 0.0f) return (uint16_t)((u >> 16) & 0x8000);
  const uint32_t sign = (u >> 16) & 0x8000, exp = ((u >> 23) & 0xff) - 127 + 15, man = (u >> 13) & 0x3ff;
  return (uint16_t)(sign | (exp << 10) | man);
}

int kernels(const uint8_t* data, size_t size) {
  Reader in{data, size};
  const uint8_t kind = in.u8();
  FpwMatrix w{};
  w.format = kind & 1 ? FPW_PARENT : kind & 32 ? FPW_DENSE : FPW_BITMASK;
  w.dtype = (kind >> 1) & 3;
  if (w.dtype == FPW_I8 && (kind & 128)) w.dtype = FPW_I4;
  const float scale_base = (float)(1 << ((kind >> 6) & 3)) / 2;  // 0.5, 1, 2, 4
  const int alpha = 2 + ((kind >> 3) & 3) % 3;
  // small, so a campaign makes millions of runs, with rare large cases for the paths only they reach: more than
  // 1024 columns (the token-batch kernel's column blocks) and up to 128 lanes (its widest register tile)
  int64_t units = 1 + in.u8() % 8;
  const uint8_t c = in.u8();
  w.cols = c < 250 ? 1 + c % 140 : 1000 + 29 * (c - 250);
  const int64_t gemv_batch = 1 + in.u8() % 10;
  const uint8_t lanes = in.u8();
  int64_t spmm_batch = lanes < 248 ? 9 + lanes % 40 : 100 + 4 * (lanes - 248);
  if (w.cols > 140) units = 1, spmm_batch = 9 + lanes % 16;  // one row of many columns
  if (spmm_batch > 48) w.cols = 1 + w.cols % 70;             // many lanes over few columns
  const int corruption = in.u8() % 16, arg = in.u8();
  w.stride = w.format == FPW_DENSE ? 0 : (w.cols + 63) / 64 * 8;
  w.alpha = w.format == FPW_PARENT ? alpha : 1;
  w.planes = w.format == FPW_PARENT ? (alpha == 2 ? 1 : 2) : 0;
  w.rows = units * w.alpha;
  if (w.dtype == FPW_I4) w.group = 16 << (units % 3);
  const int64_t words = w.stride / 8;
  const uint64_t valid = w.cols % 64 ? ((uint64_t)1 << (w.cols % 64)) - 1 : ~(uint64_t)0;
  const int64_t bit_rows = w.format == FPW_PARENT ? w.planes * units : w.format == FPW_DENSE ? 0 : units;
  std::vector<uint8_t> bits(bit_rows * w.stride);
  in.fill(bits.data(), bits.size());
  for (int64_t r = 0; r < bit_rows; r++) {  // a consistent matrix: nothing past cols, every child id below alpha
    uint64_t last;
    memcpy(&last, &bits[r * w.stride + 8 * (words - 1)], 8);
    last &= valid;
    memcpy(&bits[r * w.stride + 8 * (words - 1)], &last, 8);
  }
  if (w.format == FPW_PARENT && alpha == 3)
    for (int64_t i = 0; i < units * w.stride; i++) bits[units * w.stride + i] &= (uint8_t)~bits[i];
  std::vector<int64_t> row_ptr;
  int64_t stored = units * w.cols;
  if (w.format == FPW_BITMASK) {
    row_ptr.push_back(0);
    for (int64_t r = 0; r < units; r++) {
      int64_t c = 0;
      for (int64_t k = 0; k < w.stride; k++) c += __builtin_popcount(bits[r * w.stride + k]);
      row_ptr.push_back(row_ptr.back() + c);
    }
    stored = row_ptr.back();
  }
  std::vector<float> vals(stored + FPW_PAD, 0.0f);
  for (int64_t i = 0; i < stored; i++) vals[i] = (float)((int8_t)in.u8() % (w.dtype == FPW_I4 ? 8 : 9));
  const int64_t groups = w.dtype == FPW_I4 ? (w.cols + w.group - 1) / w.group : 1;
  std::vector<float> scale_of(w.dtype == FPW_I8 || w.dtype == FPW_I4 ? units * groups : 0);
  for (int64_t u = 0; u < (int64_t)scale_of.size(); u++) scale_of[u] = scale_base * (float)(1 << (u % 3));
  std::vector<float> x(gemv_batch * w.cols), bias(w.rows);
  for (size_t i = 0; i < x.size(); i++) x[i] = (float)((int)(i * 7 % 9) - 4);
  for (size_t i = 0; i < bias.size(); i++) bias[i] = (float)((int)(i % 5) - 2);

  // one corruption, as an edited file would carry it (0..4: none)
  int64_t value_count = (w.dtype == FPW_I4 ? (stored + 1) / 2 : stored) + FPW_PAD, bit_count = (int64_t)bits.size(), offset_count = (int64_t)row_ptr.size();
  int64_t scale_count = (int64_t)scale_of.size();
  const bool corrupt = corruption >= 5;
  switch (corruption) {
    case 5: if (!row_ptr.empty()) row_ptr[arg % row_ptr.size()] += (int8_t)arg; break;
    case 6: if (row_ptr.size() > 2) std::swap(row_ptr[1 + arg % (row_ptr.size() - 2)], row_ptr[row_ptr.size() - 1]); break;
    case 7: if (bit_rows > 0) bits[(arg % bit_rows) * w.stride + w.stride - 1] |= 0x80; else w.stride = 8; break;
    case 8: value_count -= 1 + arg % 3; break;
    case 9: if (bit_count > 0) bit_count -= 1 + arg % 8; else scale_count += scale_of.empty() ? 0 : 1; break;
    case 10: if (offset_count > 0) offset_count -= 1; break;
    case 11: if (w.dtype == FPW_I4 && arg % 2) w.group = arg % 4 == 1 ? 24 : 8; else w.stride += 8; break;
    case 12: if (!scale_of.empty()) scale_count -= 1 + arg % 2; else w.planes = arg % 3; break;
    case 13: w.alpha = arg % 6; break;
    case 14: w.rows += arg % 2 ? 1 : -1; break;
    case 15: if (w.format == FPW_PARENT && w.planes == 2) { bits[arg % (units * w.stride)] |= 1;
               bits[units * w.stride + arg % (units * w.stride)] |= 1; } break;
    default: break;
  }
  // the arrays, each in a heap block of exactly its stated size
  if (bit_count < 0) bit_count = 0;
  if (scale_count < 0) scale_count = 0;
  const int64_t value_size = w.dtype == FPW_F32 ? 4 : w.dtype == FPW_I8 || w.dtype == FPW_I4 ? 1 : 2;
  uint8_t* values = exact<uint8_t>(value_count * value_size);
  for (int64_t i = 0; i < value_count; i++) {
    const float v = i < (int64_t)vals.size() ? vals[i] : 0.0f;
    if (w.dtype == FPW_I4) {  // two per byte, element 2i in the low nibble
      const float v1 = 2 * i + 1 < (int64_t)vals.size() ? vals[2 * i + 1] : 0.0f;
      const float v0 = 2 * i < (int64_t)vals.size() ? vals[2 * i] : 0.0f;
      values[i] = (uint8_t)(((int)v0 & 15) | (((int)v1 & 15) << 4));
    } else if (w.dtype == FPW_F32) {
      memcpy(values + 4 * i, &v, 4);
    } else if (w.dtype == FPW_I8) {
      values[i] = (uint8_t)(int8_t)v;
    } else {
      const uint16_t h = half_of(v, w.dtype);
      memcpy(values + 2 * i, &h, 2);
    }
  }
  uint8_t* bit_block = bit_count ? exact<uint8_t>(bit_count) : nullptr;
  if (bit_block) memcpy(bit_block, bits.data(), bit_count);
  float* scales = scale_count ? exact<float>(scale_count) : nullptr;
  for (int64_t u = 0; u < scale_count; u++) scales[u] = u < (int64_t)scale_of.size() ? scale_of[u] : 1.0f;
  int64_t* offsets = offset_count ? exact<int64_t>(offset_count) : nullptr;
  if (offsets) memcpy(offsets, row_ptr.data(), offset_count * sizeof(int64_t));
  w.values = values;
  w.bits = bit_block;
  w.row_ptr = offsets;
  w.scales = scales;
  const FpwSizes sizes{value_count, value_size, bit_count, w.format == FPW_BITMASK ? offset_count : 0, scale_count};
  const char* why = fpw_validate(&w, &sizes);
  if (why != nullptr && !corrupt) __builtin_trap();  // the validator refused a consistent matrix
  if (why == nullptr) {
    std::vector<std::vector<float>> outs;
    run_all(w, gemv_batch, spmm_batch, x.data(), bias.data(), &outs);
    // the reference: fpw_unpack, then the product in double (exact: small integers)
    std::vector<float> dense(w.rows * w.cols);
    fpw_unpack(&w, dense.data(), 0, w.format == FPW_PARENT ? w.rows / w.alpha : w.rows);
    std::vector<float> gemv_ref(gemv_batch * w.rows), spmm_ref;
    for (int64_t b = 0; b < gemv_batch; b++)
      for (int64_t r = 0; r < w.rows; r++) {
        double s = bias[r];
        for (int64_t j = 0; j < w.cols; j++) s += (double)dense[r * w.cols + j] * x[b * w.cols + j];
        gemv_ref[b * w.rows + r] = (float)s;
      }
    for (int64_t r = 0; r < w.rows; r++)
      for (int64_t b = 0; b < spmm_batch; b++) spmm_ref.push_back(gemv_ref[(b % gemv_batch) * w.rows + r]);
    for (size_t i = 0; i < outs.size(); i += 3)
      if (outs[i] != gemv_ref || outs[i + 1] != spmm_ref || outs[i + 2] != dense) __builtin_trap();
  }
  free(values);
  free(bit_block);
  free(offsets);
  free(scales);
  return 0;
}

}  // namespace

// Says which ISA variants this CPU runs (each is fuzzed on every input), for the campaign's summary.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  fprintf(stderr, "fpewiden fuzz: ISAs");
  for (const char* isa : ISAS)
    if (fpw_select(isa)) fprintf(stderr, " %s", isa);
  fprintf(stderr, "\n");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
#ifdef FPW_FUZZ_RAW
  return raw(data, size);
#else
  return kernels(data, size);
#endif
}
