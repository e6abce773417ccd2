"""GPU kernels for the packed formats (format.py), in Triton: what `fpewiden::packed_linear` runs on CUDA tensors
(kernels.py registers `linear` for the op's CUDA dispatch when a GPU is present).

- `gemv` (decode, up to 8 inputs): one program per block of rows and input; each row's bitmask bytes are expanded
  to bits, an exclusive prefix sum of the bits gives each non-zero's place in `values`, so the stored values are
  read once per input and nothing else is fetched for a zero. The parent format reads each parent's dense row
  once and adds each product to the child its id names (one multiply-add per parent weight).
- `spmm` (token batches): the same decode into a zero-filled register tile, then `tl.dot` with a tile of inputs
  (fp32 accumulation, IEEE fp32 products so results match the CPU kernels); the parent format runs one program
  per child, each keeping the weights its child holds.

Values fp32, bf16 or fp16 widened to fp32 in registers, or int8 and int4 (two per byte) made q · scale there, in
the bitmask, parent and dense layouts; x and y fp32. CI runs every kernel on CPU tensors under
`TRITON_INTERPRET=1` (tests/test_triton.py) against the dense reference; speed is measured on a GPU by
bench/gpu_check.sh, never assumed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from fpewiden.packed.format import DTYPE_CODES, FORMATS, PackedMatrix, problem

GEMV_MAX = 8  # inputs up to which `gemv` runs (as ops.py's default before tuning)


@triton.jit
def _bits(bits_ptr, row, stride, j, mask):
    """Bit j of bitmask row `row` (rows × stride bytes, little-endian), as int32 0/1, for a [R, K] tile."""
    byte = tl.load(bits_ptr + row[:, None] * stride + (j // 8)[None, :], mask=mask, other=0).to(tl.int32)
    return (byte >> (j % 8)[None, :]) & 1


@triton.jit
def _values(values_ptr, place, mask, INT4: tl.constexpr):
    """Stored values at element indices `place`, as fp32 (int4: the nibble of byte place / 2, low first, two's
    complement; int8 and the float types widened)."""
    if INT4:
        byte = tl.load(values_ptr + place // 2, mask=mask, other=0).to(tl.int32)
        nib = (byte >> ((place & 1) * 4)) & 15
        return (nib - ((nib & 8) << 1)).to(tl.float32)
    return tl.load(values_ptr + place, mask=mask, other=0).to(tl.float32)


@triton.jit
def _scaled(v, scales_ptr, unit, j, mask, groups, group, SCALED: tl.constexpr):
    """`v` ([U, K] at columns j) times each weight's scale: one per unit (int8: groups 1, group past cols) or per
    unit and group of `group` columns (int4): q · scale, the weights format.unpack gives."""
    if SCALED:
        v = v * tl.load(scales_ptr + unit[:, None] * groups + (j // group)[None, :], mask=mask, other=0.0)
    return v


@triton.jit
def _dense_tile(values_ptr, scales_ptr, unit, cols, j, mask, groups, group, SCALED: tl.constexpr, INT4: tl.constexpr):
    """The [U, K] tile at columns j of units stored as dense rows (the dense layout's rows, the parent layout's
    parent rows), each weight times its scale."""
    v = _values(values_ptr, unit[:, None] * cols + j[None, :], mask, INT4)
    return _scaled(v, scales_ptr, unit, j, mask, groups, group, SCALED)


@triton.jit
def _bitmask_tile(values_ptr, bits_ptr, start, running, r, stride, j, mask, INT4: tl.constexpr):
    """The dense [R, K] tile of a bitmask matrix at columns j (unscaled), and how many non-zeros it held per row."""
    bit = _bits(bits_ptr, r, stride, j, mask)
    place = start[:, None] + running[:, None] + tl.cumsum(bit, axis=1) - bit
    v = _values(values_ptr, place, mask & (bit != 0), INT4)
    return v, tl.sum(bit, axis=1)


@triton.jit
def _child_ids(bits_ptr, i, parents, stride, j, mask, PLANES: tl.constexpr):
    child = _bits(bits_ptr, i, stride, j, mask)
    if PLANES > 1:
        child |= _bits(bits_ptr, parents + i, stride, j, mask) << 1
    return child


@triton.jit
def _bitmask_gemv(x_ptr, values_ptr, bits_ptr, row_ptr, bias_ptr, y_ptr, scales_ptr, rows, cols, stride, groups,
                  group, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, INT4: tl.constexpr, R: tl.constexpr,
                  K: tl.constexpr):  # fmt: skip
    b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    rmask = r < rows
    start = tl.load(row_ptr + r, mask=rmask, other=0)
    running = tl.zeros([R], dtype=tl.int64)
    acc = tl.zeros([R], dtype=tl.float32)
    for k0 in range(0, cols, K):
        j = k0 + tl.arange(0, K)
        jmask = j < cols
        mask = rmask[:, None] & jmask[None, :]
        v, n = _bitmask_tile(values_ptr, bits_ptr, start, running, r, stride, j, mask, INT4)
        v = _scaled(v, scales_ptr, r, j, mask, groups, group, SCALED)
        xv = tl.load(x_ptr + b * cols + j, mask=jmask, other=0.0)
        acc += tl.sum(v * xv[None, :], axis=1)
        running += n
    if HAS_BIAS:
        acc += tl.load(bias_ptr + r, mask=rmask, other=0.0)
    tl.store(y_ptr + b * rows + r, acc, mask=rmask)


@triton.jit
def _parent_gemv(x_ptr, values_ptr, bits_ptr, bias_ptr, y_ptr, scales_ptr, parents, cols, stride, groups, group,
                 ALPHA: tl.constexpr, PLANES: tl.constexpr, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr,
                 INT4: tl.constexpr, P: tl.constexpr, K: tl.constexpr, A2: tl.constexpr):  # fmt: skip
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(0).to(tl.int64) * P + tl.arange(0, P)
    imask = i < parents
    c = tl.arange(0, A2)
    acc = tl.zeros([P, A2], dtype=tl.float32)
    for k0 in range(0, cols, K):
        j = k0 + tl.arange(0, K)
        jmask = j < cols
        mask = imask[:, None] & jmask[None, :]
        v = _dense_tile(values_ptr, scales_ptr, i, cols, j, mask, groups, group, SCALED, INT4)  # children share
        child = _child_ids(bits_ptr, i, parents, stride, j, mask, PLANES)
        prod = v * tl.load(x_ptr + b * cols + j, mask=jmask, other=0.0)[None, :]
        acc += tl.sum(tl.where(child[:, None, :] == c[None, :, None], prod[:, None, :], 0.0), axis=2)
    out = i[:, None] * ALPHA + c[None, :]
    omask = imask[:, None] & (c < ALPHA)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out, mask=omask, other=0.0)
    tl.store(y_ptr + b * parents * ALPHA + out, acc, mask=omask)


@triton.jit
def _bitmask_spmm(x_ptr, values_ptr, bits_ptr, row_ptr, bias_ptr, y_ptr, scales_ptr, n, rows, cols, stride, groups,
                  group, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, INT4: tl.constexpr, R: tl.constexpr,
                  K: tl.constexpr, N: tl.constexpr):  # fmt: skip
    r = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    t = tl.program_id(1).to(tl.int64) * N + tl.arange(0, N)
    rmask, tmask = r < rows, t < n
    start = tl.load(row_ptr + r, mask=rmask, other=0)
    running = tl.zeros([R], dtype=tl.int64)
    acc = tl.zeros([R, N], dtype=tl.float32)
    for k0 in range(0, cols, K):
        j = k0 + tl.arange(0, K)
        jmask = j < cols
        mask = rmask[:, None] & jmask[None, :]
        v, cnt = _bitmask_tile(values_ptr, bits_ptr, start, running, r, stride, j, mask, INT4)
        v = _scaled(v, scales_ptr, r, j, mask, groups, group, SCALED)
        xt = tl.load(x_ptr + t[None, :] * cols + j[:, None], mask=jmask[:, None] & tmask[None, :], other=0.0)
        acc += tl.dot(v, xt, input_precision="ieee")
        running += cnt
    if HAS_BIAS:
        acc += tl.load(bias_ptr + r, mask=rmask, other=0.0)[:, None]
    tl.store(y_ptr + t[None, :] * rows + r[:, None], acc, mask=rmask[:, None] & tmask[None, :])


@triton.jit
def _parent_spmm(x_ptr, values_ptr, bits_ptr, bias_ptr, y_ptr, scales_ptr, n, parents, cols, stride, groups, group,
                 ALPHA: tl.constexpr, PLANES: tl.constexpr, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr,
                 INT4: tl.constexpr, P: tl.constexpr, K: tl.constexpr, N: tl.constexpr):  # fmt: skip
    i = tl.program_id(0).to(tl.int64) * P + tl.arange(0, P)
    t = tl.program_id(1).to(tl.int64) * N + tl.arange(0, N)
    c = tl.program_id(2)
    imask, tmask = i < parents, t < n
    acc = tl.zeros([P, N], dtype=tl.float32)
    for k0 in range(0, cols, K):
        j = k0 + tl.arange(0, K)
        jmask = j < cols
        mask = imask[:, None] & jmask[None, :]
        v = _dense_tile(values_ptr, scales_ptr, i, cols, j, mask, groups, group, SCALED, INT4)
        v = tl.where(_child_ids(bits_ptr, i, parents, stride, j, mask, PLANES) == c, v, 0.0)
        xt = tl.load(x_ptr + t[None, :] * cols + j[:, None], mask=jmask[:, None] & tmask[None, :], other=0.0)
        acc += tl.dot(v, xt, input_precision="ieee")
    out = i * ALPHA + c
    if HAS_BIAS:
        acc += tl.load(bias_ptr + out, mask=imask, other=0.0)[:, None]
    tl.store(y_ptr + t[None, :] * parents * ALPHA + out[:, None], acc, mask=imask[:, None] & tmask[None, :])


@triton.jit
def _dense_gemv(x_ptr, values_ptr, bias_ptr, y_ptr, scales_ptr, rows, cols, groups, group, HAS_BIAS: tl.constexpr,
                SCALED: tl.constexpr, INT4: tl.constexpr, R: tl.constexpr, K: tl.constexpr):  # fmt: skip
    """The dense layout (int8 and int4 values only): every weight stored, rows × cols row-major."""
    b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    rmask = r < rows
    acc = tl.zeros([R], dtype=tl.float32)
    for k0 in range(0, cols, K):
        j = k0 + tl.arange(0, K)
        jmask = j < cols
        mask = rmask[:, None] & jmask[None, :]
        v = _dense_tile(values_ptr, scales_ptr, r, cols, j, mask, groups, group, SCALED, INT4)
        acc += tl.sum(v * tl.load(x_ptr + b * cols + j, mask=jmask, other=0.0)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + r, mask=rmask, other=0.0)
    tl.store(y_ptr + b * rows + r, acc, mask=rmask)


@triton.jit
def _dense_spmm(x_ptr, values_ptr, bias_ptr, y_ptr, scales_ptr, n, rows, cols, groups, group, HAS_BIAS: tl.constexpr,
                SCALED: tl.constexpr, INT4: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                N: tl.constexpr):  # fmt: skip
    r = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    t = tl.program_id(1).to(tl.int64) * N + tl.arange(0, N)
    rmask, tmask = r < rows, t < n
    acc = tl.zeros([R, N], dtype=tl.float32)
    for k0 in range(0, cols, K):
        j = k0 + tl.arange(0, K)
        jmask = j < cols
        mask = rmask[:, None] & jmask[None, :]
        v = _dense_tile(values_ptr, scales_ptr, r, cols, j, mask, groups, group, SCALED, INT4)
        xt = tl.load(x_ptr + t[None, :] * cols + j[:, None], mask=jmask[:, None] & tmask[None, :], other=0.0)
        acc += tl.dot(v, xt, input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + r, mask=rmask, other=0.0)[:, None]
    tl.store(y_ptr + t[None, :] * rows + r[:, None], acc, mask=rmask[:, None] & tmask[None, :])


_CHECKED = WeakIdKeyDictionary()  # values tensor -> what was validated with it


def _validate(
    values: torch.Tensor, bits: torch.Tensor, row_ptr: torch.Tensor | None, scales: torch.Tensor | None, fields: tuple
) -> None:
    """The CPU op's gate (csrc/validate.cc) for the GPU kernels: format.problem, in its words, before a matrix's
    first run and again when a tensor, its data or its version, or a field changes (a device-to-host copy of the
    bits, offsets and scales once per matrix, not per call)."""
    arrays = [t for t in (values, bits, row_ptr, scales) if t is not None]
    key = (fields, *((id(t), t.data_ptr(), 0 if t.is_inference() else t._version) for t in arrays))
    if _CHECKED.get(values) == key:
        return
    rows, cols, fmt_code, dtype, alpha, planes, stride, group = fields
    why = None
    if fmt_code not in (0, 1, 2) or DTYPE_CODES.get(values.dtype) != dtype:
        why = "the value type code does not match the values' dtype" if fmt_code in (0, 1, 2) else "unknown format code"
    else:
        meta = torch.empty(values.numel(), dtype=values.dtype, device="meta").reshape(values.shape)
        rp = row_ptr.cpu() if row_ptr is not None and fmt_code == 0 else None
        if fmt_code == 0:
            nnz = int(rp[-1]) if rp is not None and rp.numel() else 0
        else:
            nnz = rows * cols if fmt_code == 2 else rows // max(alpha, 1) * cols
        sc = scales.cpu() if scales is not None else None
        pm = PackedMatrix(FORMATS[fmt_code], rows, cols, meta, bits.cpu(), stride, nnz, rp, alpha, planes,
                          scales=sc, group=group)  # fmt: skip
        why = problem(pm)
    if why is not None:
        raise RuntimeError(f"fpewiden: invalid packed matrix: {why}")
    _CHECKED[values] = key


def linear(
    x: torch.Tensor,
    values: torch.Tensor,
    bits: torch.Tensor,
    row_ptr: torch.Tensor | None,
    bias: torch.Tensor | None,
    rows: int,
    cols: int,
    format: int,  # the op schema's name: the dispatcher may pass it by name
    dtype: int,
    alpha: int,
    planes: int,
    stride: int,
    isa: str = "triton",
    mode: str = "",
    scales: torch.Tensor | None = None,
    group: int = 0,
) -> torch.Tensor:
    """y = x Wᵀ + bias for x (n, cols) fp32 on the tensors' device: the signature of `fpewiden::packed_linear`
    (`format` 0 bitmask, 1 parent, 2 dense (int8 and int4 only); `dtype` and `isa` are implied by the tensors here;
    `mode` "gemv" or "spmm", anything else, such as the CPU's "dense", chosen by n). int8 and int4 weights are
    q · scale (one scale per unit, int4 per unit and group of `group` columns), made in registers."""
    if x.dim() != 2 or x.shape[1] != cols or x.dtype != torch.float32:
        raise ValueError(f"fpewiden: x must be a float32 (batch, {cols}) tensor")
    _validate(values, bits, row_ptr, scales, (rows, cols, format, dtype, alpha, planes, stride, group))
    x = x.contiguous()
    n = x.shape[0]
    y = torch.empty((n, rows), dtype=torch.float32, device=x.device)
    if n == 0:
        return y
    if mode not in ("gemv", "spmm"):
        mode = "gemv" if n <= GEMV_MAX else "spmm"
    has_bias, scaled, int4 = bias is not None, scales is not None, values.dtype == torch.uint8
    b = bias if has_bias else y  # any pointer: not read without HAS_BIAS
    s = scales if scaled else y  # nor the scales without SCALED
    groups, grp = ((cols + group - 1) // group, group) if int4 else (1, cols + 1)  # int8: one scale per unit
    q = (has_bias, scaled, int4)
    if format == 2:
        if mode == "gemv":
            _dense_gemv[(triton.cdiv(rows, 16), n)](x, values, b, y, s, rows, cols, groups, grp, *q, R=16, K=64)
        else:
            grid = (triton.cdiv(rows, 32), triton.cdiv(n, 16))
            _dense_spmm[grid](x, values, b, y, s, n, rows, cols, groups, grp, *q, R=32, K=32, N=16)
        return y
    if format == 0:
        if row_ptr is None:
            raise ValueError("fpewiden: the bitmask format needs its row offsets")
        if mode == "gemv":
            _bitmask_gemv[(triton.cdiv(rows, 16), n)](x, values, bits, row_ptr, b, y, s, rows, cols, stride, groups,
                                                      grp, *q, R=16, K=64)  # fmt: skip
        else:
            grid = (triton.cdiv(rows, 32), triton.cdiv(n, 16))
            _bitmask_spmm[grid](x, values, bits, row_ptr, b, y, s, n, rows, cols, stride, groups, grp, *q, R=32, K=32,
                                N=16)  # fmt: skip
        return y
    parents = rows // alpha
    if mode == "gemv":
        a2 = 4 if alpha > 2 else 2
        _parent_gemv[(triton.cdiv(parents, 16), n)](x, values, bits, b, y, s, parents, cols, stride, groups, grp,
                                                    alpha, planes, *q, P=16, K=64, A2=a2)  # fmt: skip
    else:
        grid = (triton.cdiv(parents, 32), triton.cdiv(n, 16), alpha)
        _parent_spmm[grid](x, values, bits, b, y, s, n, parents, cols, stride, groups, grp, alpha, planes, *q, P=32,
                           K=32, N=16)  # fmt: skip
    return y
