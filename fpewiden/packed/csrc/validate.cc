// The one gate between a packed matrix someone else wrote and the kernels (fpw_kernels.h, fpw_validate): every
// binding calls it before a matrix's first run, and fpewiden/packed/format.py `problem` says the same in Python
// for the file reader. Nothing here trusts a field before it has been checked, and no size is multiplied without
// an overflow check: the fields come straight from files.
#include <stdint.h>
#include <string.h>

#include "fpw_kernels.h"

namespace {

bool mul(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out) && *out >= 0; }

uint64_t word_at(const uint8_t* p) {
  uint64_t w;
  memcpy(&w, p, 8);
  return w;
}

// Bits of a row's last word that lie past `cols` (the writer leaves them zero; a kernel would read them as
// weights past the row's values).
uint64_t past_cols(int64_t cols) { return cols % 64 ? ~(((uint64_t)1 << (cols % 64)) - 1) : 0; }

// The stored length of `elements` values and the padding: int4 holds two per byte.
int64_t stored(const FpwMatrix* w, int64_t elements) {
  return (w->dtype == FPW_I4 ? elements / 2 + elements % 2 : elements) + FPW_PAD;
}

const char* bitmask(const FpwMatrix* w, const FpwSizes* n) {
  if (w->alpha != 1 || w->planes != 0) return "a bitmask matrix has alpha 1 and no child-id planes";
  int64_t bits;
  if (!mul(w->rows, w->stride, &bits) || n->bits != bits) return "the bits are not rows x stride bytes";
  if (w->row_ptr == nullptr || n->row_ptr != w->rows + 1) return "a bitmask matrix needs rows + 1 row offsets";
  if (w->row_ptr[0] != 0) return "the first row offset is not 0";
  const int64_t words = w->stride / 8;
  const uint64_t tail = past_cols(w->cols);
  for (int64_t r = 0; r < w->rows; r++)
    if (word_at(w->bits + r * w->stride + 8 * (words - 1)) & tail) return "a row has bits past cols";
  int64_t at = 0;  // the values the rows so far hold: at most rows x stride x 8, which fits (checked above)
  for (int64_t r = 0; r < w->rows; r++) {
    const uint8_t* row = w->bits + r * w->stride;
    for (int64_t k = 0; k < words; k++) at += __builtin_popcountll(word_at(row + 8 * k));
    if (w->row_ptr[r + 1] != at) return "a row's offset difference is not its number of bits";
  }
  if (n->values != stored(w, at)) return "the values are not the rows' bits plus the padding";
  return nullptr;
}

const char* parent(const FpwMatrix* w, const FpwSizes* n) {
  if (w->alpha < 2 || w->alpha > 4) return "the parent layout needs 2 <= alpha <= 4";
  if (w->rows % w->alpha) return "rows are not a multiple of alpha";
  if (w->planes != (w->alpha == 2 ? 1 : 2)) return "planes is not ceil(log2 alpha)";
  const int64_t parents = w->rows / w->alpha;
  int64_t plane, bits, values;
  if (!mul(parents, w->stride, &plane) || !mul(plane, w->planes, &bits) || n->bits != bits)
    return "the bits are not planes x parents x stride bytes";
  if (!mul(parents, w->cols, &values) || values > INT64_MAX - FPW_PAD || n->values != stored(w, values))
    return "the values are not parents x cols plus the padding";
  const int64_t words = w->stride / 8;
  const uint64_t tail = past_cols(w->cols);
  for (int64_t i = 0; i < parents * w->planes; i++)
    if (word_at(w->bits + i * w->stride + 8 * (words - 1)) & tail) return "a child-id plane has bits past cols";
  if (w->alpha == 3)  // two planes hold ids 0..3; 3 names no child
    for (int64_t i = 0; i < parents; i++)
      for (int64_t k = 0; k < words; k++)
        if (word_at(w->bits + i * w->stride + 8 * k) & word_at(w->bits + (parents + i) * w->stride + 8 * k))
          return "a child id is not below alpha";
  return nullptr;
}

const char* dense(const FpwMatrix* w, const FpwSizes* n) {
  if (w->alpha != 1 || w->planes != 0 || w->stride != 0 || n->bits != 0 || w->row_ptr != nullptr || n->row_ptr != 0)
    return "a dense matrix has alpha 1, no bits and no row offsets";
  int64_t values;
  if (!mul(w->rows, w->cols, &values) || values > INT64_MAX - FPW_PAD || n->values != stored(w, values))
    return "the values are not rows x cols plus the padding";
  return nullptr;
}

int64_t value_size(int32_t dtype) { return dtype == FPW_F32 ? 4 : dtype == FPW_I8 || dtype == FPW_I4 ? 1 : 2; }

}  // namespace

extern "C" const char* fpw_validate(const FpwMatrix* w, const FpwSizes* n) {
  if (w == nullptr || n == nullptr) return "no matrix";
  if (w->format != FPW_BITMASK && w->format != FPW_PARENT && w->format != FPW_DENSE) return "unknown format code";
  if (w->dtype != FPW_F32 && w->dtype != FPW_BF16 && w->dtype != FPW_F16 && w->dtype != FPW_I8 && w->dtype != FPW_I4)
    return "unknown value type code";
  if (n->value_size != value_size(w->dtype)) return "the value type does not match the values' element size";
  if (w->rows < 1 || w->cols < 1) return "rows and cols must be positive";
  int64_t dense_bytes;  // fpw_unpack writes rows x cols floats
  if (!mul(w->rows, w->cols, &dense_bytes) || !mul(dense_bytes, 4, &dense_bytes)) return "rows x cols overflows";
  if (w->values == nullptr || n->values < 0 || n->bits < 0 || n->scales < 0) return "an array is missing";
  // parent: alpha is checked below, and a count that matches no alpha fails there
  const int64_t units = w->format == FPW_PARENT && w->alpha >= 2 ? w->rows / w->alpha : w->rows;
  if (w->dtype == FPW_I4) {
    if (w->group < 16 || w->group > (1 << 20) || (w->group & (w->group - 1)))
      return "int4 values need a group of a power of two from 16 columns";
    int64_t scales;
    if (!mul(units, (w->cols + w->group - 1) / w->group, &scales) || w->scales == nullptr || n->scales != scales)
      return "int4 values need one scale per unit and group";
  } else if (w->group != 0) {
    return "a group is for int4 values only";
  }
  if (w->dtype == FPW_I8) {
    if (w->scales == nullptr || n->scales != units) return "int8 values need one scale per row (parent: per parent)";
  } else if (w->dtype != FPW_I4 && (w->scales != nullptr || n->scales != 0)) {
    return "scales are for int8 and int4 values only";
  }
  if (w->format == FPW_DENSE) return dense(w, n);
  const int64_t words = w->cols / 64 + (w->cols % 64 ? 1 : 0);
  if (w->stride != words * 8) return "the bit stride is not the writer's (whole 64-bit words per row)";
  if (w->bits == nullptr) return "an array is missing";
  return w->format == FPW_BITMASK ? bitmask(w, n) : parent(w, n);
}
