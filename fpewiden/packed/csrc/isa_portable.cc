// The portable C++ variant of the packed kernels (kernel_impl.h): one lane, no intrinsics; any CPU, and the
// variant every other one is tested against besides the dense reference.
#include <stdint.h>
#include <string.h>

#include "fpw_kernels.h"
#include "half.h"

namespace fpw_portable {

struct V {
  static constexpr int W = 1, BMAX = 1, ACC = 4;
  using reg = float;
  using mask = uint32_t;  // bit 0
  static mask bits(const uint8_t* row, int64_t j) { return (row[j >> 3] >> (j & 7)) & 1u; }
  static mask tail(int n) { return n > 0 ? 1u : 0u; }
  static int count(mask m) { return (int)(m & 1u); }
  static reg zero() { return 0.0f; }
  static reg set1(float f) { return f; }
  static reg load(const float* p) { return *p; }
  static reg load_n(const float* p, int n) { return n > 0 ? *p : 0.0f; }
  template <int DT>
  static float scalar(const void* base, int64_t i) {
    if (DT == FPW_F32) return ((const float*)base)[i];
    if (DT == FPW_I8) return (float)((const int8_t*)base)[i];
    if (DT == FPW_I4) return (float)fpw_nibble((const uint8_t*)base, i);
    const uint16_t h = ((const uint16_t*)base)[i];
    return DT == FPW_F16 ? fpw_half_to_float(h) : fpw_bf16_to_float(h);
  }
  template <int DT>
  static reg values(const void* base, int64_t i) {
    return scalar<DT>(base, i);
  }
  static reg expand(mask m, reg v) { return (m & 1u) ? v : 0.0f; }
  static reg fma(reg a, reg b, reg c) { return a * b + c; }
  static reg mfma(mask m, reg a, reg b, reg c) { return (m & 1u) ? a * b + c : c; }
  static float sum(reg r) { return r; }
  static void store(float* p, reg r) { *p = r; }
  static void store_n(float* p, reg r, int n) {
    if (n > 0) *p = r;
  }
};

#include "kernel_impl.h"

}  // namespace fpw_portable

extern "C" const FpwKernels* fpw_kernels_portable(void) {
  static const FpwKernels k = {"portable", fpw_portable::gemv, fpw_portable::spmm, fpw_portable::unpack};
  return &k;
}
