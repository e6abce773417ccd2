// fpewiden's packed sparse kernels: a C ABI shared by every ISA variant and every binding (torch, ONNX Runtime).
//
// A packed matrix W (rows x cols, y = W x) is one of two formats (fpewiden/packed/format.py writes them, the
// README documents them bit by bit):
//   bitmask: `bits` holds one bit per element, row r at byte r * stride (stride: a multiple of 8 bytes), bit j
//            of the row is bit (j % 8) of byte j / 8 (little-endian, so 16 bits are one AVX-512 lane mask);
//            `values` the non-zeros row by row (row r from values[row_ptr[r]]), then PAD zeros;
//   parent:  an FPE-widened incoming matrix whose alpha children partition their parent's row: `values` the
//            parents' dense rows (rows / alpha x cols, then PAD zeros), `bits` `planes` bit planes of the child
//            id of every parent weight (plane k of parent i at byte (k * parents + i) * stride); child c of parent
//            i is output row i * alpha + c.
//   dense:   every weight: `values` rows x cols, row-major, then PAD zeros; no bits, stride 0 (what a quantized
//            checkpoint stores where no zeros are worth skipping).
// Values are f32, bf16, f16, int8 or int4; arithmetic is f32. int8 values are symmetric-quantized: weight = q * s,
// with `scales` holding one f32 s per unit (a bitmask or dense row, a parent row: a parent's children share its
// scale), so the kernels sum q * x in f32 and scale each unit's sums once. int4 values are two per byte (element
// 2k in the low nibble of byte k, two's complement, -7..7), `values` holding ceil(n / 2) + FPW_PAD bytes for n
// elements; `scales` holds one f32 per unit and group of `group` consecutive columns (unit-major, ceil(cols /
// group) per unit; group a power of two >= 16, so a vector of columns never straddles two groups): weight =
// q * scales[unit * groups + j / group], applied to each vector of values as it is loaded.
//
// The kernels trust every field and array of a matrix: a binding runs fpw_validate on a matrix before its first
// call (csrc/torch_ops.cc once per tensor, csrc/ort/ once per initializer), never a kernel on what it refused.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { FPW_BITMASK = 0, FPW_PARENT = 1, FPW_DENSE = 2 };
enum { FPW_F32 = 0, FPW_BF16 = 1, FPW_F16 = 2, FPW_I8 = 3, FPW_I4 = 4 };
#define FPW_PAD 16  // values are followed by this many zero elements (int4: bytes): kernels load whole vectors

typedef struct FpwMatrix {
  int32_t format;
  int32_t dtype;
  int64_t rows;  // output features (for parent: parents * alpha)
  int64_t cols;  // input features
  const void* values;
  const uint8_t* bits;
  const int64_t* row_ptr;  // bitmask only: rows + 1 offsets into values
  int64_t stride;          // bytes per row of bits, a multiple of 8
  int32_t alpha;           // parent only: children per parent (2..4)
  int32_t planes;          // parent only: bit planes of the child id
  const float* scales;     // int8: one per unit (rows; parent: rows / alpha); int4: one per unit and group
  int32_t group;           // int4 only: columns per scale (a power of two >= 16); 0 otherwise
} FpwMatrix;

// Few inputs (decode): y[b * ldy + r] = sum_j W[r, j] x[b * ldx + j] + bias[r], b < batch, for the output rows
// of units [u0, u1) (units: rows for bitmask and dense, parents for parent). Weights are streamed once per 8 inputs.
typedef void (*FpwGemv)(const FpwMatrix* w, const float* x, int64_t ldx, int64_t batch, const float* bias, float* y,
                        int64_t ldy, int64_t u0, int64_t u1);
// Token batches (prefill, encoders): the batch in SIMD lanes. xt is the inputs transposed (cols x ldxt), yt the
// outputs transposed (rows x ldyt): yt[r * ldyt + b] for b < batch. ldxt and ldyt are multiples of 16 and xt's
// lanes past the batch are zero (the kernels load whole vectors). Work is proportional to the non-zeros.
typedef void (*FpwSpmm)(const FpwMatrix* w, const float* xt, int64_t ldxt, int64_t batch, const float* bias,
                        float* yt, int64_t ldyt, int64_t u0, int64_t u1);

// Few inputs, int8 or int4 weights (any layout) times int8 activations, as dynamic int8 quantization runs:
// xq holds per input b (at xq + b * ldxq, ldxq a multiple of 64) round(x / sx[b]), the columns past `cols` 0
// (fpw_quantize_inputs writes them); y as FpwGemv's. Exact integer sums, for cols <= 65536.
typedef void (*FpwGemvQ8)(const FpwMatrix* w, const int8_t* xq, int64_t ldxq, const float* sx, int64_t batch,
                          const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1);
#define FPW_Q8_MAX_COLS 65536

// Dense f32 copy of a packed matrix (rows x cols, row-major) for units [u0, u1).
typedef void (*FpwUnpack)(const FpwMatrix* w, float* dense, int64_t u0, int64_t u1);

// How long the arrays behind a matrix are, as its holder knows them (a tensor's numel, an initializer's element
// count): what fpw_validate checks the matrix's own fields against.
typedef struct FpwSizes {
  int64_t values;      // elements of `values` (int4: bytes)
  int64_t value_size;  // bytes per element of `values` (4 for f32, 2 for bf16 and f16, 1 for int8 and int4's bytes)
  int64_t bits;        // bytes of `bits` (0 for dense)
  int64_t row_ptr;     // elements of `row_ptr` (bitmask; 0 where there is none)
  int64_t scales;      // elements of `scales` (int8; 0 where there is none)
} FpwSizes;

// NULL when every kernel and fpw_unpack can run `w` reading and writing in bounds: the format and value codes,
// rows, cols and stride (exactly the writer's: whole 64-bit words), every array's length, the bitmask row offsets
// (0 first, each row's offset difference equal to its popcount, the last the stored values less FPW_PAD), no bit
// past `cols`, the parent layout's alpha and planes (2 <= alpha <= 4, planes = ceil(log2 alpha), rows divisible
// by alpha) and every child id below alpha, the dense layout's rows x cols values, int8's one scale per unit,
// int4's group (a power of two >= 16) and one scale per unit and group (no scales for other value types). Else a static sentence saying what is wrong. Linear in the bits:
// run it once per matrix, not per call.
const char* fpw_validate(const FpwMatrix* w, const FpwSizes* sizes);

typedef struct FpwKernels {
  const char* isa;  // "avx512", "avx2" or "portable"
  FpwGemv gemv;
  FpwSpmm spmm;
  FpwUnpack unpack;
} FpwKernels;

const FpwKernels* fpw_kernels_avx512(void);
const FpwKernels* fpw_kernels_avx2(void);
const FpwKernels* fpw_kernels_portable(void);
// The kernels for an ISA name ("avx512", "avx2", "portable"), or NULL where this CPU lacks it; "best": the widest
// this CPU runs.
const FpwKernels* fpw_select(const char* isa);
// The int8-activation kernel (AVX-512 VNNI + VBMI + VBMI2), or NULL where this CPU lacks those.
FpwGemvQ8 fpw_select_q8(void);
// How far ahead (bytes) the VNNI kernel prefetches int8 rows for few inputs, reading dense rows one at a time: 0 for
// one pass ahead and dense rows unprefetched, as on Zen 4 and the Intel Xeons (read once from CPUID).
int64_t fpw_q8_prefetch_bytes(void);
// The int8-activation kernel that runs beside an ISA's kernels ("avx512": the VNNI kernel, int8 and int4 values;
// "avx2": fpw_gemv_q8_avx2, int8 values), or NULL where this CPU or the value type (an FpwDtype) has none.
FpwGemvQ8 fpw_select_q8_for(const char* isa, int32_t dtype);
void fpw_gemv_q8_avx512vnni(const FpwMatrix* w, const int8_t* xq, int64_t ldxq, const float* sx, int64_t batch,
                            const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1);
// AVX2 (vpmaddubsw, vpshufb): int8 values only; the same outputs as the VNNI kernel, bit for bit.
void fpw_gemv_q8_avx2(const FpwMatrix* w, const int8_t* xq, int64_t ldxq, const float* sx, int64_t batch,
                      const float* bias, float* y, int64_t ldy, int64_t u0, int64_t u1);
// The int8 values of units [u0, u1) as dense rows (q, the scales not applied; rows x cols, row-major): the
// matrix torch's int8 GEMM multiplies for token batches. Same CPUs as fpw_gemv_q8_avx512vnni; int8 matrices only.
void fpw_unpack_q8_avx512vnni(const FpwMatrix* w, int8_t* dense, int64_t u0, int64_t u1);
// Whether `isa`'s decode kernels (gemv, the int8-input gemv) run a matrix of this format and value type (FpwDtype)
// faster spread to the dense layout (fpw_spread) than in its own: on "avx2", bitmask matrices of int8 or int4
// values. Without AVX-512's expand instructions, laying a row's values out by its mask costs more than the bytes
// it saves, at every density from 5% to 50% (bench/avx2_spread.py; bench/results/quantized/avx2_spread). The
// token-batch kernel (spmm, work by the non-zeros) keeps the stored layout (the bindings keep both); the parent
// layout is never spread (it decodes one input faster than its dense expansion).
int fpw_runs_spread(const char* isa, int32_t format, int32_t dtype);
// Bytes of the dense layout's values for a bitmask matrix's: rows x cols int8 (int4: ceil(rows x cols / 2)
// bytes), then FPW_PAD zero bytes.
int64_t fpw_spread_bytes(const FpwMatrix* w);
// The dense layout's values of rows [u0, u1) of a validated bitmask matrix of int8 or int4 values: each stored
// value at its column, 0 elsewhere, the scales unchanged (one per row; int4: per row and group, as the dense
// layout's), the padding too by the call that ends at `rows`. int4 rows of an odd number of columns share bytes:
// spread those in one call over every row.
void fpw_spread(const FpwMatrix* w, void* dense, int64_t u0, int64_t u1);
// Per input row b of x (batch x cols, row stride ldx): sx[b] = max |x| / 127 (1 for a row of zeros) and
// xq[b * ldxq + j] = rint(x / sx[b]) (ties to even, clamped to +-127), 0 past `cols` up to ldxq.
void fpw_quantize_inputs(const float* x, int64_t ldx, int64_t batch, int64_t cols, int8_t* xq, int64_t ldxq,
                         float* sx);
// fpw_quantize_inputs on AVX-512 (where fpw_select_q8 runs): fpw_quantize_inputs calls it there.
void fpw_quantize_inputs_avx512(const float* x, int64_t ldx, int64_t batch, int64_t cols, int8_t* xq, int64_t ldxq,
                                float* sx);
// A dense f32 copy of units [u0, u1), one element at a time: the reference the ISA variants' unpack is tested against.
void fpw_unpack(const FpwMatrix* w, float* dense, int64_t u0, int64_t u1);

#ifdef __cplusplus
}
#endif
