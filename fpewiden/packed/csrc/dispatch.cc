// Which ISA variant runs (chosen once from the CPU's features, or forced by name), and the unpack to dense.
#include <cpuid.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "fpw_kernels.h"
#include "half.h"

// What this CPU runs, read once: the bindings select per call, and CPUID is a trap to the hypervisor in a VM.
// F16C from CPUID leaf 1 (ECX bit 29): clang before 16 has no "f16c" for __builtin_cpu_supports, and the sanitizer
// builds of the fuzz harness (csrc/fuzz/) use clang.
struct Features {
  bool avx512, avx2, q8, zen5;
  Features() {
    __builtin_cpu_init();
    unsigned a, b, c, d;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
    const unsigned family = ((a >> 8) & 0xF) == 0xF ? 0xF + ((a >> 20) & 0xFF) : (a >> 8) & 0xF;
    unsigned v[4] = {0, 0, 0, 0};
    __get_cpuid(0, &v[0], &v[1], &v[2], &v[3]);
    const bool amd = v[1] == 0x68747541 && v[3] == 0x69746e65 && v[2] == 0x444d4163;  // "AuthenticAMD"
    zen5 = amd && family >= 0x1A;
    avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && f16c && __builtin_cpu_supports("bmi") &&
           __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
    q8 = avx512 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
         __builtin_cpu_supports("avx512vbmi2") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  }
};

static const Features& cpu() {
  static const Features f;
  return f;
}

// 8 KB: four of the decode shapes' 2 KB rows (bench/results/quantized/decode_zen5_stream)
extern "C" int64_t fpw_q8_prefetch_bytes(void) { return cpu().zen5 ? 8192 : 0; }

extern "C" FpwGemvQ8 fpw_select_q8(void) { return cpu().q8 ? fpw_gemv_q8_avx512vnni : NULL; }

extern "C" FpwGemvQ8 fpw_select_q8_for(const char* isa, int32_t dtype) {
  if (isa == NULL || (dtype != FPW_I8 && dtype != FPW_I4)) return NULL;
  if (strcmp(isa, "avx512") == 0) return cpu().q8 && cpu().avx512 ? fpw_gemv_q8_avx512vnni : NULL;
  if (strcmp(isa, "avx2") == 0) return cpu().avx2 && dtype == FPW_I8 ? fpw_gemv_q8_avx2 : NULL;
  return NULL;
}

extern "C" void fpw_quantize_inputs(const float* x, int64_t ldx, int64_t batch, int64_t cols, int8_t* xq,
                                    int64_t ldxq, float* sx) {
  if (cpu().q8) return fpw_quantize_inputs_avx512(x, ldx, batch, cols, xq, ldxq, sx);
  for (int64_t b = 0; b < batch; b++) {
    const float* row = x + b * ldx;
    float peak = 0.0f;
    for (int64_t j = 0; j < cols; j++) peak = fmaxf(peak, fabsf(row[j]));
    const float s = peak > 0.0f ? peak / 127.0f : 1.0f;
    sx[b] = s;
    int8_t* out = xq + b * ldxq;
    for (int64_t j = 0; j < cols; j++) {
      const float q = fminf(fmaxf(nearbyintf(row[j] / s), -127.0f), 127.0f);  // NaN: fmaxf gives -127
      out[j] = (int8_t)q;
    }
    memset(out + cols, 0, (size_t)(ldxq - cols));
  }
}

extern "C" const FpwKernels* fpw_select(const char* isa) {
  const bool avx512 = cpu().avx512, avx2 = cpu().avx2;
  if (isa == NULL || strcmp(isa, "best") == 0) {
    if (avx512) return fpw_kernels_avx512();
    if (avx2) return fpw_kernels_avx2();
    return fpw_kernels_portable();
  }
  if (strcmp(isa, "avx512") == 0) return avx512 ? fpw_kernels_avx512() : NULL;
  if (strcmp(isa, "avx2") == 0) return avx2 ? fpw_kernels_avx2() : NULL;
  if (strcmp(isa, "portable") == 0) return fpw_kernels_portable();
  return NULL;
}

// Element i of unit `unit`'s column j, as a weight.
static inline float value_at(const FpwMatrix* w, int64_t i, int64_t unit, int64_t j) {
  if (w->dtype == FPW_F32) return ((const float*)w->values)[i];
  if (w->dtype == FPW_I8) return (float)((const int8_t*)w->values)[i] * w->scales[unit];
  if (w->dtype == FPW_I4)
    return (float)fpw_nibble((const uint8_t*)w->values, i) *
           w->scales[unit * ((w->cols + w->group - 1) / w->group) + j / w->group];
  const uint16_t h = ((const uint16_t*)w->values)[i];
  return w->dtype == FPW_F16 ? fpw_half_to_float(h) : fpw_bf16_to_float(h);
}

static inline int bit_at(const uint8_t* row, int64_t j) { return (row[j >> 3] >> (j & 7)) & 1; }

extern "C" void fpw_unpack(const FpwMatrix* w, float* dense, int64_t u0, int64_t u1) {
  const int64_t n = w->cols;
  if (w->format == FPW_DENSE) {
    for (int64_t r = u0; r < u1; r++)
      for (int64_t j = 0; j < n; j++) dense[r * n + j] = value_at(w, r * n + j, r, j);
    return;
  }
  if (w->format == FPW_BITMASK) {
    for (int64_t r = u0; r < u1; r++) {
      const uint8_t* row = w->bits + r * w->stride;
      int64_t p = w->row_ptr[r];
      float* out = dense + r * n;
      for (int64_t j = 0; j < n; j++) out[j] = bit_at(row, j) ? value_at(w, p++, r, j) : 0.0f;
    }
    return;
  }
  const int64_t parents = w->rows / w->alpha;
  for (int64_t i = u0; i < u1; i++) {
    const uint8_t* p0 = w->bits + i * w->stride;
    const uint8_t* p1 = w->bits + (parents + i) * w->stride;
    float* out = dense + i * w->alpha * n;
    memset(out, 0, sizeof(float) * w->alpha * n);
    for (int64_t j = 0; j < n; j++) {
      const int c = bit_at(p0, j) | (w->planes > 1 ? bit_at(p1, j) << 1 : 0);
      out[c * n + j] = value_at(w, i * n + j, i, j);
    }
  }
}

extern "C" int fpw_runs_spread(const char* isa, int32_t format, int32_t dtype) {
  return isa != NULL && strcmp(isa, "avx2") == 0 && format == FPW_BITMASK && (dtype == FPW_I8 || dtype == FPW_I4);
}

extern "C" int64_t fpw_spread_bytes(const FpwMatrix* w) {
  const int64_t n = w->rows * w->cols;  // fpw_validate has checked that rows x cols x 4 does not overflow
  return (w->dtype == FPW_I4 ? (n + 1) / 2 : n) + FPW_PAD;
}

extern "C" void fpw_spread(const FpwMatrix* w, void* dense, int64_t u0, int64_t u1) {
  const int64_t n = w->cols;
  if (w->dtype == FPW_I8) {
    const int8_t* values = (const int8_t*)w->values;
    int8_t* out = (int8_t*)dense;
    for (int64_t r = u0; r < u1; r++) {
      const uint8_t* row = w->bits + r * w->stride;
      const int8_t* v = values + w->row_ptr[r];
      int8_t* o = out + r * n;
      for (int64_t j = 0; j < n; j++) {  // branch-free: a random mask defeats the branch predictor
        const int b = bit_at(row, j);
        o[j] = (int8_t)(*v & -b);  // *v is in bounds: a row's next value, or the values' FPW_PAD zeros
        v += b;
      }
    }
    if (u1 == w->rows) memset(out + w->rows * n, 0, FPW_PAD);
    return;
  }
  const uint8_t* values = (const uint8_t*)w->values;
  uint8_t* out = (uint8_t*)dense;
  const int64_t first = u0 * n / 2, last = (u1 * n + 1) / 2;  // the bytes rows [u0, u1) touch
  memset(out + first, 0, (size_t)(last - first));
  for (int64_t r = u0; r < u1; r++) {
    const uint8_t* row = w->bits + r * w->stride;
    int64_t p = w->row_ptr[r];
    for (int64_t j = 0; j < n; j++) {  // branch-free, as int8's
      const int b = bit_at(row, j);
      const int64_t i = r * n + j;
      out[i >> 1] |= (uint8_t)((fpw_nibble(values, p) & 15 & -b) << ((i & 1) * 4));
      p += b;
    }
  }
  if (u1 == w->rows) memset(out + (w->rows * n + 1) / 2, 0, FPW_PAD);
}
