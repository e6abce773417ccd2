"""Bytes of weights a model moves per inference, per storage format, counted from the actual tensors.

Every weight matrix is read once per inference (batch sizes small enough that weights dominate traffic, the
paper's deployment premise). Biases and other 1-D tensors are stored dense fp32 in every format. Formats:
  dense_fp32 / dense_fp16 / dense_bf16: every entry, zeros included;
  csr_idx32 / csr_idx16: fp32 values + column indices (int32 / uint16) + int32 row pointers; uint16 needs
    fewer than 65,536 columns;
  bitmask: fp32 values + one bit per entry;
  block: the fast export layout of converted pairs (export/fast.py): grouped incoming as dense blocks (their
    entries + int32 gather indices), tied outgoing as one column per parent, grouped outgoing as one child per
    (output, parent); other matrices dense fp32. Only where a conversion has such a structure;
  packed: what `fpewiden pack` stores and its kernels read (fpewiden/packed/format.py): per matrix the smaller of
    a padded bitmask with row offsets and, for FPE-widened incoming matrices, the parent layout; dense where
    neither is smaller. The format bench's `packed` engine runs;
  parent: FPE-aware storage of converted pairs: each incoming matrix as its parent's dense values plus a child id
    per weight (⌈log2 α⌉ bits; the children of a parent partition its row), tied outgoing as one column per
    parent, other outgoing matrices in their smallest exact format; other matrices dense fp32. At α=2 a
    per-neuron split costs 1.03× the parent's fp32 bytes instead of α×.
Tied outgoing matrices are counted at their deployed size in every format (one column per parent; the checkpoint
stores equal copies so that every runtime loads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fpewiden.export.fast import Structure

FORMATS = ("dense_fp32", "dense_fp16", "dense_bf16", "csr_idx32", "csr_idx16", "bitmask", "block", "parent", "packed")


@dataclass(frozen=True)
class PairLayout:
    """A converted pair as bench counts it: incoming and outgoing matrix names, α, its fast-layout structure (None
    when it has none), and whether the outgoing matrix is tied (its mask already one column per parent)."""

    ins: tuple[str, ...]
    out: str
    alpha: int
    structure: Structure | None
    tied: bool


def matrix_bytes(mask: torch.Tensor) -> dict[str, int | None]:
    """Bytes of one (rows, cols) weight matrix with the given non-zero mask, per format (None: not applicable)."""
    rows, cols = mask.shape
    numel = rows * cols
    nnz = int(torch.count_nonzero(mask))
    return {
        "dense_fp32": numel * 4,
        "dense_fp16": numel * 2,
        "dense_bf16": numel * 2,
        "csr_idx32": nnz * (4 + 4) + (rows + 1) * 4,
        "csr_idx16": nnz * (4 + 2) + (rows + 1) * 4 if cols <= 65536 else None,
        "bitmask": nnz * 4 + math.ceil(numel / 8),
        "block": None,
        "parent": None,
    }


def _block_pair(p: PairLayout, masks: dict[str, torch.Tensor]) -> int | None:
    st = p.structure
    if st is None:
        return None
    ha, d = masks[p.ins[0]].shape
    if st.blocks is not None:  # G·α blocks: each (|S_gc| inputs × group neurons), plus the gather indices
        sizes = [int((st.groups == g).sum()) for g in range(len(st.blocks))]
        incoming = sum(len(s) * n for sets, n in zip(st.blocks, sizes, strict=True) for s in sets) * 4 * len(p.ins)
        incoming += d * len(st.blocks) * 4
    else:
        incoming = ha * d * 4 * len(p.ins)
    o, cols = masks[p.out].shape
    outgoing = o * cols * 4 if st.outgoing in ("tied", "copy") else o * (cols // p.alpha) * 4 + o * 4
    return incoming + outgoing


def _parent_pair(p: PairLayout, masks: dict[str, torch.Tensor], per: dict[str, dict]) -> int:
    ha, d = masks[p.ins[0]].shape
    bits = math.ceil(math.log2(p.alpha)) if p.alpha > 1 else 0
    incoming = (ha // p.alpha) * d * 4 * len(p.ins) + math.ceil((ha // p.alpha) * d * bits / 8) * len(p.ins)
    o, cols = masks[p.out].shape
    # the outgoing matrix in its smallest fp32-valued format (fp16/bf16 would change the numbers computed)
    exact = [v for f, v in per[p.out].items() if v is not None and f not in ("dense_fp16", "dense_bf16")]
    outgoing = o * cols * 4 if p.tied else min(exact)
    return incoming + outgoing


def model_bytes(
    masks: dict[str, torch.Tensor],
    vectors: int,
    pairs: list[PairLayout] | None = None,
    packed: int | None = None,
) -> dict[str, int | None]:
    """Total bytes per format. `masks`: every weight matrix's mask (tied ones at their deployed size); `vectors`:
    entries of 1-D tensors (biases, stored dense fp32); `pairs`: converted pairs, for the block and parent formats.

    A format not applicable to some matrix falls back to that matrix's smallest applicable format; the block and
    parent formats store matrices outside converted pairs dense fp32, and are None without converted pairs (or,
    for block, when no pair has a fast-layout structure).
    """
    per = {n: matrix_bytes(m) for n, m in masks.items()}
    totals: dict[str, int | None] = {}
    for f in FORMATS:
        if f in ("block", "parent", "packed"):
            continue
        totals[f] = sum(b[f] if b[f] is not None else min(v for v in b.values() if v is not None) for b in per.values())
        totals[f] += vectors * 4
    pairs = pairs or []
    inside = {n for p in pairs for n in (*p.ins, p.out)}
    rest = sum(per[n]["dense_fp32"] for n in per if n not in inside) + vectors * 4
    blocks = [_block_pair(p, masks) for p in pairs]
    totals["block"] = rest + sum(blocks) if pairs and all(b is not None for b in blocks) else None
    totals["parent"] = rest + sum(_parent_pair(p, masks, per) for p in pairs) if pairs else None
    totals["packed"] = packed + vectors * 4 if packed is not None else None
    return totals


def packed_weight_bytes(masks: dict[str, torch.Tensor], alphas: dict[str, int]) -> int:
    """The weight bytes of `fpewiden pack`'s output for these (stored, uncollapsed) masks; `alphas`: the
    FPE-widened incoming matrices, which may take the parent layout."""
    from fpewiden.packed.format import packed_bytes

    return sum(packed_bytes(m, 4, alphas.get(n)) for n, m in masks.items())


def best_format(totals: dict[str, int | None]) -> str:
    """The format with the fewest bytes (fp32-valued formats only: fp16/bf16 change the numbers computed); a
    quantized model's is what it stores (its `dense_fp32` is only the unquantized reference)."""
    if totals.get("stored") is not None:
        return "stored"
    exact = {k: v for k, v in totals.items() if v is not None and k not in ("dense_fp16", "dense_bf16")}
    return min(exact, key=lambda k: (exact[k], FORMATS.index(k) if k in FORMATS else len(FORMATS)))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated for (bytes: lower is better, accuracy: higher is better), by bytes."""
    front = []
    for i, (b, a) in enumerate(points):
        dominated = any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for j, (b2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def is_2_4(mask: torch.Tensor) -> bool:
    """At most 2 non-zeros in every aligned group of 4 along each row: NVIDIA's 2:4 sparse tensor core pattern.

    A widened outgoing matrix with α=2 and grouped outgoing (each output keeps one of each parent's two
    children) always qualifies; the paper's per-neuron split generally does not.
    """
    rows, cols = mask.shape
    if cols % 4:
        return False
    return bool((mask.reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def pair_layouts(loaded, masks: dict[str, torch.Tensor]) -> tuple[list[PairLayout], dict[str, torch.Tensor]]:
    """The converted pairs of a loaded checkpoint as bench counts them, and the masks with tied outgoing
    matrices collapsed to one column per parent (their deployed size)."""
    from fpewiden.errors import FpewidenError
    from fpewiden.export.fast import structures

    meta = loaded.ck.meta
    if not meta.alpha or not meta.pairs:
        return [], masks
    try:
        found = structures(loaded)
    except FpewidenError:  # no fast-layout structure: the block format does not apply, the parent one does
        found = {}
    tied = meta.tied()
    masks = dict(masks)
    layouts = []
    for p in meta.pairs:
        if p.get("transposed"):  # GPT-2's Conv1D: counted as plain matrices
            continue
        out = p["out"]
        if out in tied:
            m = masks[out]
            masks[out] = m.view(m.shape[0], -1, meta.alpha)[:, :, 0]
        layouts.append(PairLayout(tuple(p["in"]), out, meta.alpha, found.get(p["name"]), out in tied))
    return layouts, masks


GROUPS = ("attention", "ffn", "head", "embeddings", "other")


def group_of(name: str, ffn: set[str]) -> str:
    """Which group a Hugging Face tensor's bytes count in (`ffn`: the converted pairs' names, whatever they are
    called); embeddings are counted apart, since a lookup reads only the rows it needs."""
    n = name.lower()
    if name in ffn or any(k in n for k in ("intermediate", "mlp", "fc1", "fc2", "ffn", "block_in", "block_out")):
        return "ffn"
    if any(k in n for k in ("embed", "wte", "wpe", "position", "token_type")):
        return "embeddings"
    if any(k in n for k in ("lm_head", "pooler", "classifier", "score")):
        return "head"
    if any(k in n for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value")):
        return "attention"
    return "other"
