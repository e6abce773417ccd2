"""The packed formats of a weight matrix: pure tensor transformations, no I/O (the kernels in csrc/ read exactly
this layout; docs/packed.md documents it bit by bit).

A matrix W is packed as used in y = W x: (rows, cols) = (output features, input features). Three formats:

- `bitmask`: one bit per element, row-major, each row padded to `stride` bytes (a multiple of 8); bit j of row r
  is bit j % 8 (least significant first) of byte r·stride + j // 8. `values` holds the row's non-zeros in column
  order, rows one after the other (row r starts at `row_ptr[r]`), then PAD zeros.
- `parent`: an FPE-widened incoming matrix (rows = parents·α, child c of parent i is row i·α + c) whose children
  partition their parent's row (no input feeds two children of one parent). `values` holds the parents' dense
  rows ((rows/α) × cols, the weight of whichever child holds it, 0 where none does), then PAD zeros; `bits` holds
  ⌈log₂α⌉ bit planes of each weight's child id (plane k of parent i: the row at byte (k·parents + i)·stride),
  laid out like bitmask rows. 1 or 2 bits per parent weight instead of one per widened weight, and one
  multiply-add per parent weight: the paper's per-neuron FPE at the original's cost. For 2 ≤ α ≤ 4.
- `dense`: every weight, rows × cols row-major, then PAD zeros; no bits. Only for int8 values: what an int8
  checkpoint stores where skipping zeros would not make a matrix smaller.

Values are stored as fp32, bf16, fp16, int8 or int4 and multiplied in fp32. int8 values are quantized
symmetrically (fpewiden/quantize.py) with one fp32 scale per unit in `scales` (a bitmask or dense row; a parent
row, shared by its children); a weight is q · scale. int4 values (q in -7..7) are two per byte, element 2k in the
low nibble of byte k, two's complement, held in a uint8 tensor of ⌈n/2⌉ + PAD bytes; `scales` holds one fp32 per
unit and `group` consecutive columns (unit-major; `group` a power of two ≥ 16). Only kept weights are quantized:
the mask never changes.

Zeros are zeros by value; where a matrix stores -0.0 (multiplying a weight by a 0/1 mask leaves them), `negzero`
records those positions in bitmask-row layout, so unpacking gives back every bit; the kernels never read it. The
format of a matrix is chosen by its size (`best`); a matrix that no format makes smaller stays a plain tensor
(int8: the dense format).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fpewiden.quantize import BITS, Grid, dequantize_rows, expand_scales, quantize, quantize_rows, row_scales, scales_of

PAD = 16  # zeros after `values`: the kernels load whole vectors of up to 16 values
FORMATS = ("bitmask", "parent", "dense")  # csrc/fpw_kernels.h's codes, in order
INT4 = torch.uint8  # the values tensor of int4 matrices holds their nibbles as bytes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8, "int4": INT4}
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3, INT4: 4}  # csrc/fpw_kernels.h
DTYPE_SIZE = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2, torch.int8: 1, INT4: 0.5}
QUANTIZED = (torch.int8, INT4)
GROUP_SIZE = 32  # int4's default columns per scale: bench/results/quantized/quality measures 32 against 128


def stored_values(n: int, dtype: torch.dtype) -> int:
    """Bytes of `n` values (PAD excluded)."""
    return (n + 1) // 2 if dtype == INT4 else n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class PackedMatrix:
    """One packed matrix (see the module docstring). `nnz`: stored values, PAD excluded (bitmask: the matrix's
    non-zeros; parent: the parents' positions, rows/α · cols)."""

    format: str
    rows: int
    cols: int
    values: torch.Tensor  # 1-D, fp32 / bf16 / fp16 / int8, nnz + PAD elements
    bits: torch.Tensor  # 1-D uint8
    stride: int
    nnz: int
    row_ptr: torch.Tensor | None = None  # bitmask: int64, rows + 1
    alpha: int = 1  # parent: children per parent
    planes: int = 0  # parent: bit planes of the child id
    negzero: torch.Tensor | None = None  # uint8 rows × stride: where the matrix stored -0.0 (not moved at run time)
    scales: torch.Tensor | None = None  # int8: fp32, one per unit (rows; parent: rows / α); int4: per unit, group
    group: int = 0  # int4: columns per scale

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes moved per inference: the stored values (PAD excluded), the bits, the row offsets, the scales."""
        rp = 0 if self.row_ptr is None else self.row_ptr.numel() * 8
        sc = 0 if self.scales is None else self.scales.numel() * 4
        return stored_values(self.nnz, self.dtype) + self.bits.numel() + rp + sc

    @property
    def units(self) -> int:
        """Rows the kernels iterate over: parents for the parent format, rows otherwise."""
        return self.rows // self.alpha if self.format == "parent" else self.rows


def bit_stride(cols: int) -> int:
    """Bytes per row of bits: whole 64-bit words."""
    return max(8, math.ceil(cols / 64) * 8)


def negative_zeros(w: torch.Tensor) -> torch.Tensor | None:
    """Where `w` holds -0.0, as bitmask rows (None: nowhere)."""
    neg = (w == 0) & torch.signbit(w)
    return _pack_bits(neg, bit_stride(w.shape[1])) if bool(neg.any()) else None


def _pack_bits(flags: torch.Tensor, stride: int) -> torch.Tensor:
    """(rows, cols) bool -> rows × stride bytes, little-endian bits, rows padded with zero bits."""
    rows, cols = flags.shape
    padded = np.zeros((rows, stride * 8), dtype=bool)
    padded[:, :cols] = flags.numpy()
    return torch.from_numpy(np.packbits(padded, axis=1, bitorder="little").reshape(-1).copy())


def _unpack_bits(bits: torch.Tensor, rows: int, cols: int, stride: int) -> torch.Tensor:
    b = bits[: rows * stride].numpy().reshape(rows, stride)
    return torch.from_numpy(np.unpackbits(b, axis=1, bitorder="little")[:, :cols].astype(bool))


def _with_pad(values: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The values as stored, then PAD zeros; int4 (`dtype` INT4, `values` int8 q): two per byte."""
    if dtype == INT4:
        q = values.reshape(-1).to(torch.uint8) & 15
        if q.numel() % 2:
            q = torch.cat([q, torch.zeros(1, dtype=torch.uint8)])
        return torch.cat([q[0::2] | (q[1::2] << 4), torch.zeros(PAD, dtype=torch.uint8)])
    return torch.cat([values.reshape(-1), torch.zeros(PAD, dtype=values.dtype)])


def nibbles(values: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` int4 values of a stored uint8 tensor, as int8 q."""
    b = values[: (n + 1) // 2]
    q = torch.stack([b & 15, b >> 4], dim=1).reshape(-1)[:n].to(torch.int16)
    return ((q ^ 8) - 8).to(torch.int8)


def _values_in(
    w: torch.Tensor, dtype: torch.dtype | None, scales: torch.Tensor | None = None, group: int = GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`w`'s rows as stored: cast to `dtype`, or for int8 quantized per row (int4: per `group` columns of a row),
    with the scales (`scales`: the ones convert --quantize recorded, which `w` lies on; None: rounded to nearest).
    int4 gives q as int8 (_with_pad packs them two per byte)."""
    if dtype == INT4:
        grid = Grid(BITS["int4"], group)
        s = scales_of(w, grid) if scales is None else scales.reshape(w.shape[0], -1).to(torch.float32)
        return quantize(w, s, grid), s.reshape(-1).contiguous()
    if dtype != torch.int8:
        return w.to(dtype or w.dtype), None
    scales = row_scales(w) if scales is None else scales.reshape(-1).to(torch.float32)
    return quantize_rows(w, scales), scales


def pack_bitmask(
    w: torch.Tensor, dtype: torch.dtype | None = None, scales: torch.Tensor | None = None, group: int = GROUP_SIZE
) -> PackedMatrix:
    """`w` (rows, cols) in the bitmask format, values cast to `dtype` (default: w's own; int8: quantized per
    row, the mask still w's non-zeros)."""
    rows, cols = w.shape
    keep = w != 0
    stride = bit_stride(cols)
    counts = keep.sum(1, dtype=torch.int64)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=row_ptr[1:])
    q, scales = _values_in(w, dtype, scales, group)
    values = q[keep]  # boolean indexing walks row-major: each row's values in column order
    negzero = negative_zeros(w) if scales is None else None  # int8 cannot give back a -0.0 bit for bit anyway
    return PackedMatrix("bitmask", rows, cols, _with_pad(values, dtype), _pack_bits(keep, stride), stride,
                        int(counts.sum()), row_ptr, negzero=negzero, scales=scales,
                        group=group if dtype == INT4 else 0)  # fmt: skip


def pack_dense(
    w: torch.Tensor, dtype: torch.dtype = torch.int8, scales: torch.Tensor | None = None, group: int = GROUP_SIZE
) -> PackedMatrix:
    """`w` (rows, cols) in the dense format (every weight; for int8 checkpoints' matrices without zeros worth
    skipping)."""
    rows, cols = w.shape
    q, scales = _values_in(w, dtype, scales, group)
    return PackedMatrix("dense", rows, cols, _with_pad(q, dtype), torch.zeros(0, dtype=torch.uint8), 0, rows * cols,
                        scales=scales, group=group if dtype == INT4 else 0)  # fmt: skip


def planes_for(alpha: int) -> int:
    return max(1, math.ceil(math.log2(alpha)))


def pack_parent(
    w: torch.Tensor,
    alpha: int,
    dtype: torch.dtype | None = None,
    scales: torch.Tensor | None = None,
    group: int = GROUP_SIZE,
) -> PackedMatrix | None:
    """`w` (parents·α, cols), an FPE-widened incoming matrix, in the parent format; None when its children do not
    partition their parent's row (some input feeds two children of one parent), α is outside 2..4, or the
    recorded int8 `scales` (one per row) differ between children of a parent (one row holds one scale)."""
    rows, cols = w.shape
    if not 2 <= alpha <= 4 or rows % alpha:
        return None
    parents = rows // alpha
    if scales is not None:
        per_child = scales.reshape(parents, alpha, -1)
        if not bool((per_child == per_child[:, :1]).all()):
            return None
        scales = per_child[:, 0].reshape(parents, -1) if dtype == INT4 else per_child[:, 0, 0]
    held = (w != 0).view(parents, alpha, cols)
    if bool((held.sum(1) > 1).any()):
        return None
    # the child holding each weight (0 where none does; at most one does): a weighted sum, since torch's argmax
    # over a middle int8 dimension took 8 s for one 22016x4096 matrix
    child = (held.to(torch.int8) * torch.arange(alpha, dtype=torch.int8).view(1, alpha, 1)).sum(1, dtype=torch.int8)
    parent = torch.gather(w.view(parents, alpha, cols), 1, child.unsqueeze(1).long()).squeeze(1)
    parent = torch.where(held.any(1), parent, torch.zeros((), dtype=w.dtype))
    stride = bit_stride(cols)
    planes = planes_for(alpha)
    bits = torch.cat([_pack_bits(((child >> k) & 1).bool(), stride) for k in range(planes)])
    q, scales = _values_in(parent, dtype, scales, group)  # quantized: parent rows' scales, shared by their children
    return PackedMatrix("parent", rows, cols, _with_pad(q, dtype), bits, stride, parents * cols, None, alpha, planes,
                        negative_zeros(w) if scales is None else None, scales,
                        group if dtype == INT4 else 0)  # fmt: skip


def unpack(pm: PackedMatrix) -> torch.Tensor:
    """The dense (rows, cols) matrix in the values' dtype (int8: dequantized to fp32, q · scale as the kernels
    compute it): bit for bit the packed one when no cast happened."""
    out = _unpack_values(pm)
    if pm.dtype == INT4:
        per_unit = expand_scales(pm.scales.view(pm.units, -1), pm.cols, Grid(BITS["int4"], pm.group))
        a = pm.alpha if pm.format == "parent" else 1
        out = (out.view(pm.units, a, pm.cols).to(torch.float32) * per_unit.unsqueeze(1)).view(pm.rows, pm.cols)
    elif pm.scales is not None:
        out = dequantize_rows(out.view(pm.units, -1), pm.scales).view(pm.rows, pm.cols)
    if pm.negzero is not None:  # it signs zeros, never erases a stored weight (the kernels never read it)
        neg = _unpack_bits(pm.negzero, pm.rows, pm.cols, pm.stride)
        out[neg & (out == 0)] = -0.0
    return out


def structure(pm: PackedMatrix) -> torch.Tensor | None:
    """The (rows, cols) boolean pattern a layout encodes beside its values: the bitmask itself, or for the parent
    layout each weight's child (one True per parent weight among its α rows); None for dense. Where a
    checkpoint's mask equals it, a packed file need not store the mask again."""
    if pm.format == "dense":
        return None
    if pm.format == "bitmask":
        return _unpack_bits(pm.bits, pm.rows, pm.cols, pm.stride)
    ids = torch.arange(pm.alpha).view(1, pm.alpha, 1)
    return (_child_ids(pm).unsqueeze(1) == ids).reshape(pm.rows, pm.cols)


def _child_ids(pm: PackedMatrix) -> torch.Tensor:
    """The parent layout's child id of every parent weight, (parents, cols), from its bit planes."""
    parents = pm.rows // pm.alpha
    child = torch.zeros((parents, pm.cols), dtype=torch.int64)
    for k in range(pm.planes):
        plane = pm.bits[k * parents * pm.stride : (k + 1) * parents * pm.stride]
        child |= _unpack_bits(plane, parents, pm.cols, pm.stride).long() << k
    return child


def _unpack_values(pm: PackedMatrix) -> torch.Tensor:
    """The stored values at their places (int4: q as int8)."""
    values = nibbles(pm.values, pm.nnz) if pm.dtype == INT4 else pm.values[: pm.nnz]
    zero = torch.zeros((pm.rows, pm.cols), dtype=values.dtype)
    if pm.format == "dense":
        return values.view(pm.rows, pm.cols).clone()
    if pm.format == "bitmask":
        keep = _unpack_bits(pm.bits, pm.rows, pm.cols, pm.stride)
        zero[keep] = values
        return zero
    parents = pm.rows // pm.alpha
    parent = values.view(parents, pm.cols)
    out = zero.view(parents, pm.alpha, pm.cols)
    out.scatter_(1, _child_ids(pm).unsqueeze(1), parent.unsqueeze(1))
    return zero


def problem(pm: PackedMatrix) -> str | None:
    """What makes `pm` unsafe for the kernels, in the words of csrc/validate.cc's fpw_validate (which the torch and
    ONNX Runtime bindings run on every matrix before its first call), or None. The file reader calls it, so a bad
    file is refused in one line on every path, the pure-torch fallback's included."""
    if pm.format not in FORMATS:
        return "unknown format code"
    if pm.values.dtype not in DTYPE_CODES or pm.values.dim() != 1 or pm.bits.dtype != torch.uint8:
        return "unknown value type code"
    if pm.rows < 1 or pm.cols < 1:
        return "rows and cols must be positive"
    units = pm.rows // pm.alpha if pm.format == "parent" and pm.alpha >= 2 else pm.rows
    sc = pm.scales
    bad_scales = sc is not None and (sc.dtype != torch.float32 or sc.dim() != 1)
    if pm.values.dtype == INT4:
        g = pm.group
        if not (isinstance(g, int) and 16 <= g <= 1 << 20 and g & (g - 1) == 0):
            return "int4 values need a group of a power of two from 16 columns"
        if sc is None or bad_scales or sc.numel() != units * -(-pm.cols // g):
            return "int4 values need one scale per unit and group"
    elif pm.group != 0:
        return "a group is for int4 values only"
    if pm.values.dtype == torch.int8:
        if sc is None or bad_scales or sc.numel() != units:
            return "int8 values need one scale per row (parent: per parent)"
    elif pm.values.dtype != INT4 and sc is not None:
        return "scales are for int8 and int4 values only"
    if pm.format == "dense":
        if pm.alpha != 1 or pm.planes != 0 or pm.stride != 0 or pm.bits.numel() != 0 or pm.row_ptr is not None:
            return "a dense matrix has alpha 1, no bits and no row offsets"
        if pm.values.numel() != _padded(pm, pm.rows * pm.cols) or pm.nnz != pm.rows * pm.cols:
            return "the values are not rows x cols plus the padding"
        return None
    if pm.stride != bit_stride(pm.cols):
        return "the bit stride is not the writer's (whole 64-bit words per row)"
    words = pm.bits.numpy().view(np.uint64) if pm.bits.numel() % 8 == 0 else None
    tail = np.uint64(0) if pm.cols % 64 == 0 else ~np.uint64((1 << (pm.cols % 64)) - 1)
    if pm.format == "bitmask":
        if pm.alpha != 1 or pm.planes != 0:
            return "a bitmask matrix has alpha 1 and no child-id planes"
        if pm.bits.numel() != pm.rows * pm.stride or words is None:
            return "the bits are not rows x stride bytes"
        if pm.row_ptr is None or pm.row_ptr.dtype != torch.int64 or pm.row_ptr.shape != (pm.rows + 1,):
            return "a bitmask matrix needs rows + 1 row offsets"
        ptr = pm.row_ptr.numpy()
        if ptr[0] != 0:
            return "the first row offset is not 0"
        rows = words.reshape(pm.rows, pm.stride // 8)
        if (rows[:, -1] & tail).any():
            return "a row has bits past cols"
        counts = np.unpackbits(pm.bits.numpy().reshape(pm.rows, pm.stride), axis=1).sum(1, dtype=np.int64)
        if not (np.diff(ptr) == counts).all():
            return "a row's offset difference is not its number of bits"
        if pm.values.numel() != _padded(pm, int(ptr[-1])) or pm.nnz != int(ptr[-1]):
            return "the values are not the rows' bits plus the padding"
        return None
    if not 2 <= pm.alpha <= 4:
        return "the parent layout needs 2 <= alpha <= 4"
    if pm.rows % pm.alpha:
        return "rows are not a multiple of alpha"
    if pm.planes != planes_for(pm.alpha):
        return "planes is not ceil(log2 alpha)"
    parents = pm.rows // pm.alpha
    if pm.bits.numel() != pm.planes * parents * pm.stride or words is None:
        return "the bits are not planes x parents x stride bytes"
    if pm.values.numel() != _padded(pm, parents * pm.cols) or pm.nnz != parents * pm.cols:
        return "the values are not parents x cols plus the padding"
    planes = words.reshape(pm.planes, parents, pm.stride // 8)
    if (planes[:, :, -1] & tail).any():
        return "a child-id plane has bits past cols"
    if pm.alpha == 3 and (planes[0] & planes[1]).any():
        return "a child id is not below alpha"
    return None


def _padded(pm: PackedMatrix, n: int) -> int:
    """The stored length of `n` values and PAD (int4: bytes)."""
    return (n + 1) // 2 + PAD if pm.values.dtype == INT4 else n + PAD


def dense_bytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    return stored_values(rows * cols, dtype)


def best(
    w: torch.Tensor,
    dtype: torch.dtype | None = None,
    alpha: int | None = None,
    scales: torch.Tensor | None = None,
    group: int = GROUP_SIZE,
) -> PackedMatrix | None:
    """The smallest packed form of `w` (`alpha`: the matrix is an FPE-widened incoming one, so the parent format
    is tried too), or None when no format is smaller than `w` stored densely in `dtype`. Quantized types always
    give a matrix (the dense format where no other is smaller): the quantized values must be stored somewhere.
    `scales`: scales that `w` already lies on (convert --quantize; int8 one per row, int4 per row and `group`);
    None: round to nearest."""
    dtype = dtype or w.dtype
    rows, cols = w.shape
    size = DTYPE_SIZE.get(dtype, torch.empty((), dtype=dtype).element_size())
    # scale bytes per unit
    per_unit = 4 if dtype == torch.int8 else 4 * -(-cols // group) if dtype == INT4 else 0
    stride = bit_stride(cols)
    dense = dense_bytes(rows, cols, dtype) + rows * per_unit
    # sizes first (the parent format's needs no values; its partition check runs only where it would win)
    bitmask = int(int(torch.count_nonzero(w)) * size) + rows * stride + (rows + 1) * 8 + rows * per_unit
    parent = None
    if alpha is not None and 2 <= alpha <= 4 and rows % alpha == 0:
        parent = (rows // alpha) * (int(cols * size) + planes_for(alpha) * stride + per_unit)
    if parent is not None and parent < bitmask and parent < dense:
        pm = pack_parent(w, alpha, dtype, scales, group)  # type: ignore[arg-type]
        if pm is not None:
            return pm
    if bitmask < dense:
        return pack_bitmask(w, dtype, scales, group)
    return pack_dense(w, dtype, scales, group) if dtype in QUANTIZED else None


def packed_bytes(mask: torch.Tensor, itemsize: int = 4, alpha: int | None = None) -> int:
    """Bytes per inference of a matrix with this non-zero mask as `best` would store it (dense where no packed
    format is smaller), from the mask alone: what bench reports for models it has not packed."""
    rows, cols = mask.shape
    stride = bit_stride(cols)
    sizes = [rows * cols * itemsize, int(mask.sum()) * itemsize + rows * stride + (rows + 1) * 8]
    if alpha is not None and 2 <= alpha <= 4 and rows % alpha == 0:
        parents = rows // alpha
        if not bool((mask.view(parents, alpha, cols).sum(1) > 1).any()):
            sizes.append(parents * cols * itemsize + planes_for(alpha) * parents * stride)
    return min(sizes)
