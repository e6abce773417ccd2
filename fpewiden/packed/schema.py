"""The packed checkpoint's schema: how a packed matrix is named and described in a safetensors file.

A packed checkpoint is plain safetensors. Every Linear weight that a packed format makes smaller (format.py) is
replaced by its arrays, named by prefix (numpy reads them as they are):

    fpewiden_packed.values.NAME   the values (F32, BF16, F16, I8; int4: U8, two per byte), PAD zeros at the end
    fpewiden_packed.bits.NAME     U8: the bitmask rows, or the parent format's child-id planes (none for dense)
    fpewiden_packed.row_ptr.NAME  I64, bitmask only: where each row's values start
    fpewiden_packed.scales.NAME   F32, quantized values only: one scale per row (parent: per parent); int4: per
                                  row (parent) and `group` columns

and the metadata key `fpewiden.packed` (JSON) says, per NAME, how: format, rows and cols as used in y = W x, the
tensor's stored shape and dtype, whether it was transposed (GPT-2's Conv1D stores W as inputs × outputs), α and
bit planes (parent), bit stride and stored values. Everything else (biases, norms, embeddings, attention left
dense, fpewiden's masks) is copied byte for byte, except a mask the layout already encodes (a bitmask, the parent
layout's child planes: `mask` in the entry), which unpack derives again. An MLP file stays one .safetensors; a
Hugging Face folder keeps its config and tokenizer and renames its weight files `*.packed.safetensors`, so
transformers cannot load it half-initialised by mistake: fpewiden.packed.load does. pack.py writes it, reader.py
reads and checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fpewiden.io.safetensors_stream import DTYPE_NAMES, DTYPES
from fpewiden.packed import format as fmt

PACKED_KEY = "fpewiden.packed"
PREFIX = "fpewiden_packed."
SUFFIX = ".packed.safetensors"
INDEX = "model.packed.safetensors.index.json"
PACKED_ONLY = (PACKED_KEY, "fpewiden.packed_from", "fpewiden.written_by")  # metadata the unpacked files drop


@dataclass(frozen=True)
class Entry:
    """How one matrix is stored (the JSON of `fpewiden.packed`, per tensor)."""

    format: str
    rows: int
    cols: int
    shape: list[int]  # the tensor's shape in the unpacked checkpoint
    dtype: str  # the values' safetensors dtype
    source_dtype: str
    transposed: bool
    stride: int
    nnz: int
    alpha: int = 1
    planes: int = 0
    negzero: bool = False  # the matrix stored -0.0 somewhere: `fpewiden_packed.negzero.NAME` says where
    mask: bool = False  # the checkpoint's mask of NAME is this layout's structure (format.structure): not stored
    group: int = 0  # int4 (dtype U8): columns per scale

    def arrays(self, name: str) -> dict[str, str]:
        """role -> tensor name in the packed file."""
        roles = ["values", *(["bits"] if self.format != "dense" else [])]
        roles += ["row_ptr"] if self.format == "bitmask" else []
        roles += ["negzero"] if self.negzero else []
        roles += ["scales"] if self.dtype in ("I8", "U8") else []
        return {r: f"{PREFIX}{r}.{name}" for r in roles}


def entry_of(pm: fmt.PackedMatrix, shape: tuple[int, ...], source: str, transposed: bool) -> Entry:
    return Entry(pm.format, pm.rows, pm.cols, list(shape), DTYPE_NAMES[pm.dtype], source, transposed, pm.stride,
                 pm.nnz, pm.alpha, pm.planes, pm.negzero is not None, group=pm.group)  # fmt: skip


def arrays_of(pm: fmt.PackedMatrix) -> dict[str, torch.Tensor]:
    out = {"values": pm.values, "bits": pm.bits}
    if pm.format == "dense":
        del out["bits"]
    if pm.row_ptr is not None:
        out["row_ptr"] = pm.row_ptr
    if pm.negzero is not None:
        out["negzero"] = pm.negzero
    if pm.scales is not None:
        out["scales"] = pm.scales
    return out


def matrix(entry: Entry, arrays: dict[str, torch.Tensor]) -> fmt.PackedMatrix:
    """The PackedMatrix of an entry, from its arrays (by role)."""
    e = entry
    bits = arrays.get("bits", torch.zeros(0, dtype=torch.uint8))
    return fmt.PackedMatrix(e.format, e.rows, e.cols, arrays["values"], bits, e.stride, e.nnz, arrays.get("row_ptr"),
                            e.alpha, e.planes, arrays.get("negzero"), arrays.get("scales"), e.group)  # fmt: skip


def dense(entry: Entry, pm: fmt.PackedMatrix) -> torch.Tensor:
    """The stored tensor back, in its source dtype (bit for bit when the values kept that dtype)."""
    w = fmt.unpack(pm).to(DTYPES[entry.source_dtype])
    return (w.T if entry.transposed else w).contiguous().reshape(entry.shape)


def packed_name(file: str) -> str:
    return file[: -len(".safetensors")] + SUFFIX if file.endswith(".safetensors") else file + SUFFIX
