// torch binding of the packed kernels: the `fpewiden::packed_linear` op (fpewiden/packed/ops.py registers its fake
// kernel for torch.compile and chooses the mode per call), threads from torch's intra-op pool (at::parallel_for).
// Defined in C++ so a call costs one dispatch, not a Python custom op's (about 30 us, measured).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

#include "fpw_kernels.h"

namespace {

// Matrices fpw_validate has passed, by the values tensor, with what was checked: a matrix is validated before its
// first run and again only when a tensor, its data or its version (an in-place write) or a field changes, so a call
// costs one lookup. The weak references keep each TensorImpl's address from being reused while its entry lives
// (weak references hold the object, not its storage); entries of freed tensors are swept as the table grows.
// Inference tensors have no version counter: for them identity and data pointers decide.
using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Checked {
  Weak values, bits, row_ptr, scales;
  const void* data[4];
  uint32_t versions[4];
  FpwMatrix w;
};

uint32_t version_of(const at::Tensor& t) { return t.defined() && !t.is_inference() ? t._version() : 0; }

bool same(const FpwMatrix& a, const FpwMatrix& b) {
  return a.format == b.format && a.dtype == b.dtype && a.rows == b.rows && a.cols == b.cols && a.stride == b.stride &&
         a.alpha == b.alpha && a.planes == b.planes && a.group == b.group;
}

void validate(const FpwMatrix& w, const at::Tensor& values, const at::Tensor& bits, const at::Tensor& row_ptr,
              const at::Tensor& scales) {
  static std::mutex lock;
  static std::unordered_map<const c10::TensorImpl*, Checked> seen;
  static size_t sweep_at = 64;
  const void* data[4] = {values.data_ptr(), bits.data_ptr(), row_ptr.defined() ? row_ptr.data_ptr() : nullptr,
                         scales.defined() ? scales.data_ptr() : nullptr};
  const uint32_t versions[4] = {version_of(values), version_of(bits), version_of(row_ptr), version_of(scales)};
  std::lock_guard<std::mutex> guard(lock);
  auto it = seen.find(values.unsafeGetTensorImpl());
  if (it != seen.end()) {
    const Checked& c = it->second;
    const bool hit = c.bits._unsafe_get_target() == bits.unsafeGetTensorImpl() &&
                     c.row_ptr._unsafe_get_target() == row_ptr.unsafeGetTensorImpl() &&
                     c.scales._unsafe_get_target() == scales.unsafeGetTensorImpl() &&
                     std::memcmp(c.data, data, sizeof data) == 0 &&
                     std::memcmp(c.versions, versions, sizeof versions) == 0 && same(c.w, w);
    if (hit) return;
    seen.erase(it);
  }
  const FpwSizes sizes{values.numel(), (int64_t)values.element_size(), bits.numel(),
                       row_ptr.defined() ? row_ptr.numel() : 0, scales.defined() ? scales.numel() : 0};
  const char* why = fpw_validate(&w, &sizes);
  TORCH_CHECK(why == nullptr, "fpewiden: invalid packed matrix: ", why);
  if (seen.size() >= sweep_at) {
    for (auto e = seen.begin(); e != seen.end();) e = e->second.values.expired() ? seen.erase(e) : std::next(e);
    sweep_at = std::max<size_t>(64, 2 * seen.size());
  }
  Checked c{Weak(values.getIntrusivePtr()), Weak(bits.getIntrusivePtr()), Weak(row_ptr.getIntrusivePtr()),
            Weak(scales.getIntrusivePtr()),
            {data[0], data[1], data[2], data[3]},
            {versions[0], versions[1], versions[2], versions[3]},
            w};
  seen.emplace(values.unsafeGetTensorImpl(), std::move(c));
}

// The matrix the tensors and fields describe, validated (fpw_validate) before any kernel may read it.
FpwMatrix view(const at::Tensor& values, const at::Tensor& bits, const std::optional<at::Tensor>& row_ptr, int64_t rows,
               int64_t cols, int64_t format, int64_t dtype, int64_t alpha, int64_t planes, int64_t stride,
               const std::optional<at::Tensor>& scales, int64_t group) {
  TORCH_CHECK(values.device().is_cpu() && bits.device().is_cpu(), "fpewiden: packed tensors must be on the CPU");
  TORCH_CHECK(values.is_contiguous() && bits.is_contiguous(), "fpewiden: packed tensors must be contiguous");
  TORCH_CHECK(bits.scalar_type() == at::kByte, "fpewiden: bits must be uint8");
  const at::ScalarType vt = values.scalar_type();
  TORCH_CHECK((dtype == FPW_F32 && vt == at::kFloat) || (dtype == FPW_BF16 && vt == at::kBFloat16) ||
                  (dtype == FPW_F16 && vt == at::kHalf) || (dtype == FPW_I8 && vt == at::kChar) ||
                  (dtype == FPW_I4 && vt == at::kByte),
              "fpewiden: invalid packed matrix: the value type code does not match the values' dtype");
  at::Tensor rp;
  if (row_ptr.has_value() && format == FPW_BITMASK) {
    rp = *row_ptr;
    TORCH_CHECK(rp.scalar_type() == at::kLong && rp.is_contiguous() && rp.device().is_cpu(),
                "fpewiden: row_ptr must be a contiguous int64 CPU tensor");
  }
  at::Tensor sc;
  if (scales.has_value()) {
    sc = *scales;
    TORCH_CHECK(sc.scalar_type() == at::kFloat && sc.is_contiguous() && sc.device().is_cpu(),
                "fpewiden: scales must be a contiguous float32 CPU tensor");
  }
  TORCH_CHECK(format >= INT32_MIN && format <= INT32_MAX && alpha >= INT32_MIN && alpha <= INT32_MAX &&
                  planes >= INT32_MIN && planes <= INT32_MAX && group >= 0 && group <= INT32_MAX,
              "fpewiden: invalid packed matrix: a field is out of range");
  FpwMatrix w;
  w.format = (int32_t)format;
  w.dtype = (int32_t)dtype;
  w.rows = rows;
  w.cols = cols;
  w.values = values.data_ptr();
  w.bits = bits.numel() > 0 ? bits.data_ptr<uint8_t>() : nullptr;
  w.row_ptr = rp.defined() ? rp.data_ptr<int64_t>() : nullptr;
  w.stride = stride;
  w.alpha = (int32_t)alpha;
  w.planes = (int32_t)planes;
  w.scales = sc.defined() ? sc.data_ptr<float>() : nullptr;
  w.group = (int32_t)group;
  validate(w, values, bits, rp, sc);
  return w;
}

const FpwKernels* kernels(const std::string& isa) {
  const FpwKernels* k = fpw_select(isa.c_str());
  TORCH_CHECK(k != nullptr, "fpewiden: this CPU cannot run the ", isa, " kernels");
  return k;
}

int64_t units(const FpwMatrix& w) { return w.format == FPW_PARENT ? w.rows / w.alpha : w.rows; }

// Rows per task: enough work that a task outweighs the pool's overhead (about 64k multiply-adds).
int64_t grain(const FpwMatrix& w, int64_t batch) {
  const int64_t per_unit = w.cols * (w.format == FPW_PARENT ? w.alpha : 1) * (batch < 1 ? 1 : batch);
  const int64_t g = (1 << 16) / (per_unit < 1 ? 1 : per_unit);
  return g < 1 ? 1 : g;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bits,
                  const std::optional<at::Tensor>& row_ptr, const std::optional<at::Tensor>& bias, int64_t rows,
                  int64_t cols, int64_t format, int64_t dtype, int64_t alpha, int64_t planes, int64_t stride,
                  std::string isa, std::string mode, const std::optional<at::Tensor>& scales, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "fpewiden: x must be a contiguous float32 (batch, ", cols, ") tensor");
  const FpwMatrix w = view(values, bits, row_ptr, rows, cols, format, dtype, alpha, planes, stride, scales, group);
  const FpwKernels* k = kernels(isa);
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == rows && bias->is_contiguous(), "fpewiden: bias");
    b = bias->data_ptr<float>();
  }
  const int64_t n = x.size(0);
  if (mode == "dense") {  // unpack and GEMM: the large batches where the GEMM's efficiency wins
    at::Tensor dense = at::empty({rows, cols}, x.options());
    float* d = dense.data_ptr<float>();
    at::parallel_for(0, units(w), grain(w, 1), [&](int64_t u0, int64_t u1) { k->unpack(&w, d, u0, u1); });
    return at::linear(x, dense, bias.has_value() ? *bias : at::Tensor());
  }
  if (mode == "gemv") {
    at::Tensor y = at::empty({n, rows}, x.options());
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, units(w), grain(w, n), [&](int64_t u0, int64_t u1) {
      k->gemv(&w, xp, cols, n, b, yp, rows, u0, u1);
    });
    return y;
  }
  if (mode == "gemv_q8") {  // int8 activations (per input row), int8 (or, on VNNI, int4) weights
    const FpwGemvQ8 q8 = fpw_select_q8_for(isa.c_str(), w.dtype);
    TORCH_CHECK(q8 != nullptr, "fpewiden: gemv_q8 runs int8 values on the avx2 kernels, or int8 and int4 values on "
                "the avx512 kernels with VNNI and VBMI2");
    TORCH_CHECK(cols <= FPW_Q8_MAX_COLS, "fpewiden: gemv_q8 runs matrices of at most ", FPW_Q8_MAX_COLS, " columns");
    const int64_t ldq = (cols + 63) / 64 * 64;
    at::Tensor xq = at::empty({n, ldq}, x.options().dtype(at::kChar));
    at::Tensor sx = at::empty({n}, x.options());
    fpw_quantize_inputs(x.data_ptr<float>(), cols, n, cols, xq.data_ptr<int8_t>(), ldq, sx.data_ptr<float>());
    at::Tensor y = at::empty({n, rows}, x.options());
    const int8_t* xp = xq.data_ptr<int8_t>();
    const float* sp = sx.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, units(w), grain(w, n), [&](int64_t u0, int64_t u1) {
      q8(&w, xp, ldq, sp, n, b, yp, rows, u0, u1);
    });
    return y;
  }
  if (mode == "int8_mm") {  // token batches: inputs quantized per row, torch's int8 GEMM on the int8 values
    TORCH_CHECK(fpw_select_q8() != nullptr, "fpewiden: int8_mm needs VNNI (without it oneDNN's int8 GEMM saturates)");
    TORCH_CHECK(w.dtype == FPW_I8 && cols <= FPW_Q8_MAX_COLS && cols >= 16,
                "fpewiden: int8_mm runs int8 matrices of 16 to ", FPW_Q8_MAX_COLS, " columns");
    at::Tensor xq = at::empty({n, cols}, x.options().dtype(at::kChar));
    at::Tensor sx = at::empty({n}, x.options());
    fpw_quantize_inputs(x.data_ptr<float>(), cols, n, cols, xq.data_ptr<int8_t>(), cols, sx.data_ptr<float>());
    at::Tensor wq;
    if (w.format == FPW_DENSE) {
      wq = values.narrow(0, 0, rows * cols).view({rows, cols});
    } else {
      wq = at::empty({rows, cols}, values.options());
      int8_t* d = wq.data_ptr<int8_t>();
      at::parallel_for(0, units(w), grain(w, 1), [&](int64_t u0, int64_t u1) {
        fpw_unpack_q8_avx512vnni(&w, d, u0, u1);
      });
    }
    at::Tensor row_scales = scales->narrow(0, 0, units(w));
    if (w.format == FPW_PARENT) row_scales = row_scales.repeat_interleave(alpha);
    at::Tensor y = at::_int_mm(xq, wq.t()).to(at::kFloat).mul_(sx.unsqueeze(1).mul(row_scales.unsqueeze(0)));
    return bias.has_value() ? y.add_(*bias) : y;
  }
  TORCH_CHECK(mode == "spmm", "fpewiden: mode is gemv, gemv_q8, int8_mm, spmm or dense");
  const int64_t ld = (n + 15) / 16 * 16;  // whole vectors of lanes, the padding zero
  at::Tensor xt = at::zeros({cols, ld}, x.options());
  xt.narrow(1, 0, n).copy_(x.t());
  at::Tensor yt = at::empty({rows, ld}, x.options());
  const float* xp = xt.data_ptr<float>();
  float* yp = yt.data_ptr<float>();
  at::parallel_for(0, units(w), grain(w, n), [&](int64_t u0, int64_t u1) {
    k->spmm(&w, xp, ld, n, b, yp, ld, u0, u1);
  });
  return yt.narrow(1, 0, n).t().contiguous();
}

at::Tensor unpack(const at::Tensor& values, const at::Tensor& bits, const std::optional<at::Tensor>& row_ptr,
                  int64_t rows, int64_t cols, int64_t format, int64_t dtype, int64_t alpha, int64_t planes,
                  int64_t stride, std::string isa, const std::optional<at::Tensor>& scales, int64_t group) {
  const FpwMatrix w = view(values, bits, row_ptr, rows, cols, format, dtype, alpha, planes, stride, scales, group);
  at::Tensor dense = at::empty({rows, cols}, values.options().dtype(at::kFloat));
  float* d = dense.data_ptr<float>();
  if (isa == "reference") {
    at::parallel_for(0, units(w), grain(w, 1), [&](int64_t u0, int64_t u1) { fpw_unpack(&w, d, u0, u1); });
  } else {
    const FpwKernels* k = kernels(isa);
    at::parallel_for(0, units(w), grain(w, 1), [&](int64_t u0, int64_t u1) { k->unpack(&w, d, u0, u1); });
  }
  return dense;
}

// The dense layout's values of a bitmask matrix of int8 or int4 values (fpw_spread): what PackedLinear runs where
// fpw_runs_spread says the kernels are faster so (int8 or uint8, like `values`; the scales stay as they are).
at::Tensor spread(const at::Tensor& values, const at::Tensor& bits, const std::optional<at::Tensor>& row_ptr,
                  int64_t rows, int64_t cols, int64_t format, int64_t dtype, int64_t alpha, int64_t planes,
                  int64_t stride, const std::optional<at::Tensor>& scales, int64_t group) {
  const FpwMatrix w = view(values, bits, row_ptr, rows, cols, format, dtype, alpha, planes, stride, scales, group);
  TORCH_CHECK(w.format == FPW_BITMASK && (w.dtype == FPW_I8 || w.dtype == FPW_I4),
              "fpewiden: only bitmask matrices of int8 or int4 values are spread");
  at::Tensor out = at::empty({fpw_spread_bytes(&w)}, values.options());
  void* d = out.data_ptr();
  if (w.dtype == FPW_I4 && cols % 2)  // rows share bytes: one pass
    fpw_spread(&w, d, 0, rows);
  else
    at::parallel_for(0, rows, grain(w, 1), [&](int64_t u0, int64_t u1) { fpw_spread(&w, d, u0, u1); });
  return out;
}

// A copy of `t` in memory the kernel may back with 2 MiB pages (madvise; this machine's THP mode is "madvise"):
// one TLB entry per 2 MiB instead of per 4 KiB. Measured at 11008x4096, 50%, one thread: 7.1 -> 6.1-6.5 ms.
at::Tensor hugepage_copy(const at::Tensor& t) {
  const at::Tensor src = t.contiguous();
  const size_t huge = size_t(2) << 20, bytes = src.numel() * src.element_size();
  const size_t size = (bytes + huge - 1) / huge * huge;
  void* p = std::aligned_alloc(huge, size > 0 ? size : huge);
  TORCH_CHECK(p != nullptr, "fpewiden: out of memory for ", bytes, " bytes");
  madvise(p, size, MADV_HUGEPAGE);  // a hint: where it is refused the copy is simply in ordinary pages
  std::memcpy(p, src.data_ptr(), bytes);
  return at::from_blob(p, src.sizes(), [](void* q) { std::free(q); }, src.options());
}

std::string best_isa() { return fpw_select("best")->isa; }

bool has_isa(std::string isa) { return fpw_select(isa.c_str()) != nullptr; }

bool has_q8(std::string isa, int64_t dtype) { return fpw_select_q8_for(isa.c_str(), (int32_t)dtype) != nullptr; }

bool has_vnni() { return fpw_select_q8() != nullptr; }

bool runs_spread(std::string isa, int64_t format, int64_t dtype) {
  return fpw_runs_spread(isa.c_str(), (int32_t)format, (int32_t)dtype) != 0;
}

}  // namespace

TORCH_LIBRARY(fpewiden, m) {
  m.def(
      "packed_linear(Tensor x, Tensor values, Tensor bits, Tensor? row_ptr, Tensor? bias, int rows, int cols, int format, "
      "int dtype, int alpha, int planes, int stride, str isa, str mode, Tensor? scales=None, int group=0) -> Tensor");
  m.def(
      "packed_unpack(Tensor values, Tensor bits, Tensor? row_ptr, int rows, int cols, int format, int dtype, int alpha, "
      "int planes, int stride, str isa, Tensor? scales=None, int group=0) -> Tensor");
  m.def(
      "packed_spread(Tensor values, Tensor bits, Tensor? row_ptr, int rows, int cols, int format, int dtype, int alpha, "
      "int planes, int stride, Tensor? scales=None, int group=0) -> Tensor");
  m.def("hugepage_copy(Tensor t) -> Tensor");
  m.def("best_isa() -> str", &best_isa);
  m.def("has_isa(str isa) -> bool", &has_isa);
  m.def("has_q8(str isa, int dtype) -> bool", &has_q8);
  m.def("has_vnni() -> bool", &has_vnni);
  m.def("runs_spread(str isa, int format, int dtype) -> bool", &runs_spread);
}

TORCH_LIBRARY_IMPL(fpewiden, CPU, m) {
  m.impl("packed_linear", &linear);
  m.impl("packed_unpack", &unpack);
  m.impl("packed_spread", &spread);
  m.impl("hugepage_copy", &hugepage_copy);
}
