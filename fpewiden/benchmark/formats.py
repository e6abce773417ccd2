"""Bytes of weights a model moves per inference, per storage format, counted from the actual tensors.

Every weight matrix is read once per inference (batch sizes small enough that weights dominate traffic, the
paper's deployment premise). Biases and other 1-D tensors are stored dense fp32 in every format. Formats:
  dense_fp32 / dense_fp16 / dense_bf16: every entry, zeros included;
  csr_idx32 / csr_idx16: fp32 values + column indices (int32 / uint16) + int32 row pointers; uint16 needs
    fewer than 65,536 columns;
  bitmask: fp32 values + one bit per entry;
  block: the fast export layout (dense blocks holding the pair's parent-sized weights + int32 permutations),
    only for pairs converted with --split shared --outgoing grouped.
"""

from __future__ import annotations

import math

import torch

FORMATS = ("dense_fp32", "dense_fp16", "dense_bf16", "csr_idx32", "csr_idx16", "bitmask", "block")


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
    }


def block_bytes(in_shape: tuple[int, int], out_shape: tuple[int, int], alpha: int) -> int:
    """The fast layout of one pair: blocks hold (h·α × d/α) + (o/α × h·α) fp32 entries, plus int32 permutations."""
    ha, d = in_shape
    o = out_shape[0]
    return (ha * d // alpha + o * ha // alpha) * 4 + (d + o) * 4


def model_bytes(
    masks: dict[str, torch.Tensor],
    vectors: int,
    blocks: list[tuple[str, str, int]] | None = None,
) -> dict[str, int | None]:
    """Total bytes per format. `masks`: every weight matrix's mask; `vectors`: entries of 1-D tensors (biases);
    `blocks`: (incoming, outgoing, α) pairs stored in the block layout, for the block format.

    A format not applicable to some matrix falls back to that matrix's smallest applicable format; the block
    format applies only when `blocks` is given, with the other matrices dense fp32.
    """
    per = {n: matrix_bytes(m) for n, m in masks.items()}
    totals: dict[str, int | None] = {}
    for f in FORMATS:
        if f == "block":
            continue
        totals[f] = sum(b[f] if b[f] is not None else min(v for v in b.values() if v is not None) for b in per.values())
        totals[f] += vectors * 4
    if blocks:
        in_block = {w for w, _, _ in blocks} | {o for _, o, _ in blocks}
        total = sum(block_bytes(tuple(masks[w].shape), tuple(masks[o].shape), a) for w, o, a in blocks)
        total += sum(per[n]["dense_fp32"] for n in per if n not in in_block)
        totals["block"] = total + vectors * 4
    else:
        totals["block"] = None
    return totals


def best_format(totals: dict[str, int | None]) -> str:
    """The format with the fewest bytes (fp32-valued formats only: fp16/bf16 change the numbers computed)."""
    exact = {k: v for k, v in totals.items() if v is not None and k not in ("dense_fp16", "dense_bf16")}
    return min(exact, key=lambda k: (exact[k], FORMATS.index(k)))


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
