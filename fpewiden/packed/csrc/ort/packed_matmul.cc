// ONNX Runtime binding of the packed kernels: the custom op `ai.fpewiden::PackedMatMul` (fpewiden/export/packed.py
// writes it; fpewiden/packed/ort.py builds and locates this library).
//
//   Y = PackedMatMul(X, values, bits, row_ptr?, bias?, scales?)   X: float (..., cols) -> Y: float (..., rows)
//   attributes: format ("bitmask" | "parent" | "dense"), rows, cols, stride, alpha, planes, group (int4's
//   columns per scale; absent or 0 otherwise) (fpewiden/packed/format.py)
//
// `values` is float, bfloat16, float16, int8 or uint8 (int4, two per byte; the op accepts any element type and
// checks it); int8 and int4 values come with their `scales`. The initializers are read where ONNX Runtime holds
// them, never copied. Threads come from the session's intra-op pool (KernelContext_ParallelFor), so
// `intra_op_num_threads` sets them as for every other node. Few inputs run the decode kernel (weights streamed
// once per 8 inputs), more run the token-batch kernel (the batch in SIMD lanes); int8 and int4 values run with
// int8 inputs at every batch where an int8-input kernel runs beside the chosen ISA's (the torch op's gemv_q8: VNNI
// for int8 and int4 values, AVX2 for int8 values). Where the chosen ISA runs a layout slower than dense
// (fpw_runs_spread: int8 and int4 bitmask matrices on AVX2), the values are spread to the dense layout once, at
// session creation, and run for few inputs (below), as the torch op's PackedLinear does; more run the stored layout.
//
// Built against the C API headers of ONNX Runtime 1.21 (API version 21): it loads in any ONNX Runtime >= 1.21.
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "../fpw_kernels.h"

namespace {

constexpr int64_t GEMV_MAX = 8;  // inputs per call the decode kernel runs (ops.py's default before tuning)
constexpr int64_t MAX_TASKS = 256;  // tasks per call: ample for any intra-op pool, few enough to cost nothing

// Back a large constant initializer with 2 MiB pages where it lies (one TLB entry per 2 MiB instead of per 4 KiB),
// as the torch binding does with a copy: here in place, so the weights are never held twice. MADV_COLLAPSE
// (Linux 6.1+) rebuilds the range's pages now; where the kernel refuses (older kernel, THP off, file-backed
// memory) the weights stay in ordinary pages and run as before. What 2 MiB pages give these kernels:
// bench/huge_pages.py.
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // Linux's value; glibc 2.36 does not name it yet, an older kernel answers EINVAL
#endif
void huge_pages(const void* p, size_t bytes) {
#ifdef __linux__
  const uintptr_t huge = uintptr_t(2) << 20, a = (uintptr_t)p, lo = (a + huge - 1) & ~(huge - 1);
  const uintptr_t hi = (a + bytes) & ~(huge - 1);
  if (bytes < (size_t(1) << 20) || hi <= lo) return;
  madvise((void*)lo, hi - lo, MADV_HUGEPAGE);
  madvise((void*)lo, hi - lo, MADV_COLLAPSE);
#else
  (void)p;
  (void)bytes;
#endif
}

struct Kernel {
  FpwMatrix w{};        // the op's fields
  FpwMatrix checked{};  // the matrix over the constant initializers, validated at creation
  FpwMatrix run{};      // what the kernels run for them: `checked`, or its values spread (fpw_runs_spread)
  std::vector<uint8_t> spread;
  bool validated = false;
  const FpwKernels* k = nullptr;

  Kernel(const OrtApi& api, const OrtKernelInfo* info) {
    (void)api;
    Ort::ConstKernelInfo ki(info);
    const std::string format = ki.GetAttribute<std::string>("format");
    w.format = format == "bitmask" ? FPW_BITMASK : format == "parent" ? FPW_PARENT : format == "dense" ? FPW_DENSE
                                                                                                   : -1;  // refused
    int64_t group = 0;  // files written before int4 have no such attribute
    try {
      group = ki.GetAttribute<int64_t>("group");
    } catch (const Ort::Exception&) {
    }
    w.group = group >= 0 && group <= INT32_MAX ? (int32_t)group : -1;
    w.rows = ki.GetAttribute<int64_t>("rows");
    w.cols = ki.GetAttribute<int64_t>("cols");
    w.stride = ki.GetAttribute<int64_t>("stride");
    const int64_t alpha = ki.GetAttribute<int64_t>("alpha"), planes = ki.GetAttribute<int64_t>("planes");
    w.alpha = alpha >= INT32_MIN && alpha <= INT32_MAX ? (int32_t)alpha : 0;  // out of range: refused as alpha
    w.planes = planes >= INT32_MIN && planes <= INT32_MAX ? (int32_t)planes : -1;
    const char* forced = std::getenv("FPEWIDEN_KERNEL");
    k = fpw_select(forced && *forced && std::strcmp(forced, "torch") != 0 ? forced : "best");
    if (k == nullptr) throw std::runtime_error("fpewiden PackedMatMul: this CPU cannot run the forced kernels");
    // constant initializers are validated here, once: a bad file fails at session creation, before any run
    // (values, bits, row_ptr where the bitmask layout has it, scales where given)
    Ort::ConstValue arrays[5];
    bool constant = true;
    for (size_t i : {1, 2, 3, 5}) {
      if (i >= ki.GetInputCount()) break;
      if (i == 3 && w.format != FPW_BITMASK) continue;
      int is_constant = 0;
      arrays[i - 1] = ki.GetTensorConstantInput(i, &is_constant);
      if (i == 5 && !arrays[4]) break;  // no scales: an input left out
      constant = constant && is_constant && arrays[i - 1];
    }
    if (constant) {
      checked = matrix(arrays[0], arrays[1], arrays[2], arrays[4]);
      validated = true;
      auto info = arrays[0].GetTensorTypeAndShapeInfo();
      const size_t size = checked.dtype == FPW_F32 ? 4 : checked.dtype == FPW_I8 || checked.dtype == FPW_I4 ? 1 : 2;
      huge_pages(checked.values, info.GetElementCount() * size);
      huge_pages(checked.bits, arrays[1].GetTensorTypeAndShapeInfo().GetElementCount());
      run = checked;
      // where this ISA runs the layout slower than dense, the values spread once, as the torch op does (ops.py):
      // held beside the initializers (ONNX Runtime keeps those)
      if (fpw_runs_spread(k->isa, checked.format, checked.dtype)) {
        spread.resize((size_t)fpw_spread_bytes(&checked));
        fpw_spread(&checked, spread.data(), 0, checked.rows);
        huge_pages(spread.data(), spread.size());
        run.format = FPW_DENSE, run.values = spread.data(), run.bits = nullptr, run.row_ptr = nullptr;
        run.stride = 0, run.alpha = 1, run.planes = 0;
      }
    }
  }

  // The matrix of the op's fields and these arrays, refused unless fpw_validate passes it.
  FpwMatrix matrix(Ort::ConstValue values, Ort::ConstValue bits, Ort::ConstValue row_ptr,
                   Ort::ConstValue scales) const {
    FpwMatrix m = w;
    auto vi = values.GetTensorTypeAndShapeInfo();
    int64_t size = 2;
    switch (vi.GetElementType()) {
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: m.dtype = FPW_F32, size = 4; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: m.dtype = FPW_BF16; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: m.dtype = FPW_F16; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: m.dtype = FPW_I8, size = 1; break;
      case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: m.dtype = FPW_I4, size = 1; break;
      default: throw std::runtime_error("fpewiden PackedMatMul: values must be float, bfloat16, float16, int8 or uint8");
    }
    FpwSizes sizes{(int64_t)vi.GetElementCount(), size, (int64_t)bits.GetTensorTypeAndShapeInfo().GetElementCount(),
                   0, 0};
    m.values = values.GetTensorRawData();
    m.bits = bits.GetTensorData<uint8_t>();
    m.row_ptr = nullptr;
    if (m.format == FPW_BITMASK && row_ptr) {
      sizes.row_ptr = (int64_t)row_ptr.GetTensorTypeAndShapeInfo().GetElementCount();
      m.row_ptr = row_ptr.GetTensorData<int64_t>();
    }
    m.scales = nullptr;
    if (scales) {
      auto si = scales.GetTensorTypeAndShapeInfo();
      if (si.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw std::runtime_error("fpewiden PackedMatMul: scales must be float");
      sizes.scales = (int64_t)si.GetElementCount();
      m.scales = scales.GetTensorData<float>();
    }
    if (const char* why = fpw_validate(&m, &sizes))
      throw std::runtime_error(std::string("fpewiden PackedMatMul: invalid packed matrix: ") + why);
    return m;
  }

  struct Task {
    const Kernel* self;
    FpwMatrix w;
    int64_t units;  // rows (bitmask) or parents
    const float* x;
    int64_t ld_in, n, ld_out;
    const float* bias;
    float* y;
    int64_t grain;
    bool spmm;
    FpwGemvQ8 q8 = nullptr;  // int8 inputs: xq (ld_in bytes per input) and their scales sx
    const int8_t* xq = nullptr;
    const float* sx = nullptr;
  };

  static void run_chunk(void* data, size_t i) {
    const Task* t = static_cast<const Task*>(data);
    const int64_t u0 = (int64_t)i * t->grain, u1 = std::min(t->units, u0 + t->grain);
    if (t->q8)
      t->q8(&t->w, t->xq, t->ld_in, t->sx, t->n, t->bias, t->y, t->ld_out, u0, u1);
    else if (t->spmm)
      t->self->k->spmm(&t->w, t->x, t->ld_in, t->n, t->bias, t->y, t->ld_out, u0, u1);
    else
      t->self->k->gemv(&t->w, t->x, t->ld_in, t->n, t->bias, t->y, t->ld_out, u0, u1);
  }

  // Errors reach ONNX Runtime as a status (no exception crosses its C API): a bad file fails the session's creation
  // or the run, with the reason.
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    try {
      Compute(context);
    } catch (const std::exception& e) {
      return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
    }
    return nullptr;
  }

  void Compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    Ort::ConstValue x = ctx.GetInput(0), values = ctx.GetInput(1), bits = ctx.GetInput(2);
    Ort::ConstValue row_ptr = ctx.GetInputCount() > 3 ? ctx.GetInput(3) : Ort::ConstValue{};
    Ort::ConstValue bias = ctx.GetInputCount() > 4 ? ctx.GetInput(4) : Ort::ConstValue{};
    Ort::ConstValue scales = ctx.GetInputCount() > 5 ? ctx.GetInput(5) : Ort::ConstValue{};
    auto xi = x.GetTensorTypeAndShapeInfo();
    if (xi.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      throw std::runtime_error("fpewiden PackedMatMul: X must be float");
    std::vector<int64_t> shape = xi.GetShape();
    if (shape.empty() || shape.back() != w.cols)
      throw std::runtime_error("fpewiden PackedMatMul: X's last axis must be cols = " + std::to_string(w.cols));
    int64_t n = 1;
    for (size_t d = 0; d + 1 < shape.size(); d++) n *= shape[d];

    // the initializers checked at creation, else (inputs fed at run time) these arrays, checked now
    const bool same = validated && values.GetTensorRawData() == checked.values &&
                      bits.GetTensorRawData() == checked.bits &&
                      (!checked.row_ptr || (row_ptr && row_ptr.GetTensorRawData() == checked.row_ptr)) &&
                      (!checked.scales || (scales && scales.GetTensorRawData() == checked.scales));
    // spread values (`run`) where they decoded faster in every case measured (bench/results/quantized/avx2_spread):
    // int8 at every batch (its int8-input kernel runs them all), int4 up to GEMV_MAX inputs (beyond, the token-batch
    // kernel's work follows the non-zeros: sparse int4 won there at low density); the torch op picks per batch by
    // measurement instead (crossover.py)
    const bool spread_here = checked.dtype == FPW_I8 || n <= GEMV_MAX;
    const FpwMatrix m = same ? (spread_here ? run : checked) : matrix(values, bits, row_ptr, scales);
    const int64_t units = m.format == FPW_PARENT ? m.rows / m.alpha : m.rows;
    const float* b = nullptr;
    if (bias) {
      auto bi = bias.GetTensorTypeAndShapeInfo();
      if (bi.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || bi.GetElementCount() != (size_t)w.rows)
        throw std::runtime_error("fpewiden PackedMatMul: bias must be float (rows)");
      b = bias.GetTensorData<float>();
    }
    shape.back() = w.rows;
    Ort::UnownedValue yv = ctx.GetOutput(0, shape.data(), shape.size());
    float* y = yv.GetTensorMutableData<float>();
    if (n == 0) return;
    const float* xp = x.GetTensorData<float>();

    const bool spmm = n > GEMV_MAX;
    // Units per task: enough work to outweigh a task's cost (about 64k multiply-adds), and at most MAX_TASKS tasks:
    // ORT calls the function once per index, and one row per task left wide, short matrices far behind the torch
    // binding at token batches (bench/results/ort_packed is measured with this split)
    const int64_t per_unit = w.cols * (w.format == FPW_PARENT ? w.alpha : 1) * n;
    const int64_t grain = std::max({int64_t(1), (int64_t(1) << 16) / std::max<int64_t>(1, per_unit),
                                    (units + MAX_TASKS - 1) / MAX_TASKS});
    const size_t chunks = (size_t)((units + grain - 1) / grain);
    // int8 inputs where an int8-input kernel runs beside the chosen ISA's (as the torch op: VNNI for int8 and int4
    // values, AVX2 for int8), at every batch: the VNNI kernel's passes of 4 inputs beat the f32-input token-batch
    // kernel on quantized values by 4x at 16 inputs (bench/results/quantized/ort_int8); no int8 GEMM here
    const FpwGemvQ8 q8 = w.cols <= FPW_Q8_MAX_COLS ? fpw_select_q8_for(k->isa, m.dtype) : nullptr;
    if (q8) {
      const int64_t ldq = (w.cols + 63) / 64 * 64;
      std::vector<int8_t> xq((size_t)(n * ldq));
      std::vector<float> sx((size_t)n);
      fpw_quantize_inputs(xp, w.cols, n, w.cols, xq.data(), ldq, sx.data());
      Task t{this, m, units, xp, ldq, n, w.rows, b, y, grain, false, q8, xq.data(), sx.data()};
      ctx.ParallelFor(&run_chunk, chunks, 0, &t);
      return;
    }
    if (!spmm) {
      Task t{this, m, units, xp, w.cols, n, w.rows, b, y, grain, false};
      ctx.ParallelFor(&run_chunk, chunks, 0, &t);
      return;
    }
    const int64_t ld = (n + 15) / 16 * 16;  // whole vectors of lanes, the padding zero
    std::vector<float> xt((size_t)(w.cols * ld), 0.0f), yt((size_t)(w.rows * ld));
    for (int64_t r = 0; r < n; r++)
      for (int64_t j = 0; j < w.cols; j++) xt[j * ld + r] = xp[r * w.cols + j];
    Task t{this, m, units, xt.data(), ld, n, ld, b, yt.data(), grain, true};
    ctx.ParallelFor(&run_chunk, chunks, 0, &t);
    for (int64_t r = 0; r < n; r++)
      for (int64_t o = 0; o < w.rows; o++) y[r * w.rows + o] = yt[o * ld + r];
  }
};

struct PackedMatMul : Ort::CustomOpBase<PackedMatMul, Kernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new Kernel(api, info);
    } catch (const std::exception& e) {
      return api.CreateStatus(ORT_INVALID_GRAPH, e.what());
    }
    return nullptr;
  }
  const char* GetName() const { return "PackedMatMul"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t i) const {
    switch (i) {
      case 0: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
      case 1: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float, bfloat16, float16, int8, uint8: checked
      case 2: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 3: return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

const PackedMatMul op;

}  // namespace

extern "C" {

// The ONNX Runtime entry point: SessionOptions.register_custom_ops_library(fpewiden.packed.ort_library()).
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) return nullptr;  // unreachable: ONNX Runtime refuses an API version it lacks before this
  Ort::InitApi(api);
  try {
    static Ort::CustomOpDomain domain("ai.fpewiden");  // outlives every session that uses it
    static bool added = false;
    if (!added) {
      domain.Add(&op);
      added = true;
    }
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}

// What `fpewiden.packed.ort` checks it loaded: the kernels' ISA this library would run.
__attribute__((visibility("default"))) const char* fpewiden_ort_isa(void) { return fpw_select("best")->isa; }
}
