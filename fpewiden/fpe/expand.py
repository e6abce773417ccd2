"""Fixed Parameter Expansion of one expandable pair, and exact-budget magnitude pruning.

Conventions: incoming matrices are neuron-major, shape (neurons, inputs); the outgoing matrix is (outputs, neurons).
A gated MLP has several incoming matrices (gate and up) that share one partition. Children of neuron i are rows
i·α … i·α+α−1 (parent-major), the same order for biases and outgoing columns.

Pruning never needs the expanded pair in memory at once: splitting moves values without changing them and
copying repeats each outgoing value α times, so the magnitude threshold is found on the parent tensors (outgoing
counts weighted by α) by a radix select over the float bit patterns. Each expanded tensor is then built, pruned
and handed out on its own, which keeps a Llama-sized conversion at a few tensors of memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fpewiden.errors import FpewidenError

_CHUNK = 1 << 22
_KEY_VIEW = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def count(mask: torch.Tensor) -> int:
    """Non-zeros of a mask; count_nonzero is ~25x faster than bool.sum() on CPU."""
    return int(torch.count_nonzero(mask))


def row_counts(mask: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Non-zeros per row, in blocks: count_nonzero(dim=1) on a whole matrix allocates 4 bytes per entry."""
    return torch.cat([torch.count_nonzero(block, dim=1) for block in mask.split(rows)])


@dataclass
class Pair:
    """An expandable pair: incoming matrices (with masks and optional biases) and the outgoing matrix."""

    w_in: list[torch.Tensor]
    m_in: list[torch.Tensor]
    b_in: list[torch.Tensor | None]
    w_out: torch.Tensor
    m_out: torch.Tensor

    @property
    def neurons(self) -> int:
        return self.w_in[0].shape[0]

    def nnz(self) -> int:
        return sum(count(m) for m in self.m_in) + count(self.m_out)

    def support(self) -> torch.Tensor:
        """Inputs a neuron reads in any incoming matrix: what its children partition."""
        s = self.m_in[0].clone()
        for m in self.m_in[1:]:
            s |= m
        return s


def magnitude_keys(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Integers ordered exactly like |t|: the bit pattern of a non-negative IEEE float is monotonic in its value."""
    a = t.detach().abs()
    if a.dtype != dtype:
        a = a.to(dtype)
    return a.view(_KEY_VIEW[dtype])


def key_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1 and next(iter(dtypes)) in _KEY_VIEW:
        return next(iter(dtypes))
    return torch.float32 if all(d != torch.float64 for d in dtypes) else torch.float64


def kth_key(sources: list[tuple[torch.Tensor, torch.Tensor, int]], k: int, dtype: torch.dtype) -> tuple[int, int]:
    """Radix select: the k-th smallest magnitude key (1-based) over masked entries, each counted `mult` times.
    `sources` are (magnitude keys, as `magnitude_keys` makes them, mask, mult).

    Returns (key, how many counted entries are strictly smaller). 16 bits per pass: one pass for bf16/fp16, two
    for fp32, four for fp64; memory is one chunk of keys, time is linear.
    """
    bits = torch.finfo(dtype).bits
    prefix, below = 0, 0
    dense = [count(m) == m.numel() for _, m, _ in sources]  # a full mask needs no selection
    for shift in range(bits - 16, -1, -16):
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for (t, m, mult), full in zip(sources, dense, strict=True):
            flat_t, flat_m = t.reshape(-1), m.reshape(-1)
            for i in range(0, flat_t.numel(), _CHUNK):
                keys = flat_t[i : i + _CHUNK]
                if not full:
                    keys = keys[flat_m[i : i + _CHUNK]]
                if shift + 16 < bits:
                    keys = keys[(keys >> (shift + 16)) == prefix]
                digits = keys if bits == 16 else (keys >> shift) & 0xFFFF
                hist += torch.bincount(digits, minlength=1 << 16) * mult
        cum = hist.cumsum(0)
        digit = int(torch.searchsorted(cum, k - below))
        below += int(cum[digit - 1]) if digit else 0
        prefix = (prefix << 16) | digit
    return prefix, below


def expand_incoming(
    w: torch.Tensor, m: torch.Tensor, assignment: torch.Tensor, alpha: int, second: torch.Tensor | None = None
):
    """Child c of neuron i keeps W[i, j] exactly where assignment[i, j] == c and the parent had it.

    `second` (the overlap control only) names a further child that also receives input j (-1: none), so children
    overlap instead of partitioning the parent.
    """
    h = w.shape[0]
    children = torch.arange(alpha, dtype=torch.int8).view(1, alpha, 1)
    take = assignment.unsqueeze(1) == children
    if second is not None:
        take |= second.unsqueeze(1) == children
    mask = (m.unsqueeze(1) & take).reshape(h * alpha, -1)
    wide = (w.unsqueeze(1) * mask.view(h, alpha, -1)).reshape(h * alpha, -1)
    return wide, mask


def _drop(
    w: torch.Tensor, m: torch.Tensor, threshold: int, ties_left: int, dtype: torch.dtype
) -> tuple[torch.Tensor, int]:
    """Mask without keys below the threshold and without the first `ties_left` keys equal to it (row-major).

    Ties are looked for chunk by chunk and only until enough are gone. Returns the mask and how many ties
    remain to be removed in later tensors.
    """
    keep = m & (magnitude_keys(w, dtype) >= threshold)
    flat_w, flat_keep = w.reshape(-1), keep.view(-1)
    for i in range(0, flat_w.numel(), _CHUNK):
        if not ties_left:
            break
        ties = flat_keep[i : i + _CHUNK] & (magnitude_keys(flat_w[i : i + _CHUNK], dtype) == threshold)
        idx = torch.nonzero(ties).flatten()[:ties_left]
        flat_keep[i + idx] = False
        ties_left -= len(idx)
    return keep, ties_left


def _incoming_block(
    w: torch.Tensor, keys: torch.Tensor, m: torch.Tensor, a: torch.Tensor, alpha: int, threshold: int, ties_left: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A block of parent rows of an incoming matrix, split over children and pruned; the pruning decision is made
    once per parent weight (each lands in exactly one child) and ties go by their position in the widened
    tensor, so the result is what pruning the widened block would give, at a fraction of the work."""
    rows, d = w.shape
    keep = m
    if threshold >= 0:
        keep = m & (keys >= threshold)
        if ties_left:
            tie = torch.nonzero(keep & (keys == threshold))
            if len(tie):
                r, c = tie.unbind(1)
                first = ((r * alpha + a[r, c].long()) * d + c).argsort()[:ties_left]
                keep[r[first], c[first]] = False
                ties_left -= len(first)
    children = torch.arange(alpha, dtype=torch.int8).view(1, alpha, 1)
    mask = (a.unsqueeze(1) == children) & keep.unsqueeze(1)
    wide = (w.unsqueeze(1) * mask).reshape(rows * alpha, d)
    return wide, mask.reshape(rows * alpha, d), ties_left


def _copied_block(
    w: torch.Tensor, keys: torch.Tensor, m: torch.Tensor, alpha: int, threshold: int, ties_left: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A block of outgoing rows with every column copied α times, pruned: one decision per parent weight for all
    its copies, except at the threshold where ties are removed copy by copy in widened row-major order."""
    if threshold < 0:
        keep = m.repeat_interleave(alpha, dim=1)
    else:
        parent = m & (keys >= threshold)
        keep = parent.repeat_interleave(alpha, dim=1)
        if ties_left:
            tie = torch.nonzero(parent & (keys == threshold))
            take = min(ties_left, len(tie) * alpha)
            if take:
                slot = torch.arange(take)
                r, c = tie[slot // alpha].unbind(1)
                keep[r, c * alpha + slot % alpha] = False
                ties_left -= take
    return w.repeat_interleave(alpha, dim=1).mul_(keep), keep, ties_left


def _row_block(cols: int) -> int:
    """Rows per block: about _CHUNK elements, a multiple of 8 so bit-packed masks of blocks concatenate."""
    return max(8, (_CHUNK // max(cols, 1)) // 8 * 8)


OUTGOING = ("copy", "grouped", "tied")


def grouped_outgoing(rows: range, n_cols: int, alpha: int) -> torch.Tensor:
    """The 1:α outgoing pattern: output r reads only child r mod α of every parent (a (rows, neurons·α) mask).
    (`tied`, the other alternative to copies, shares one outgoing column among a parent's children: the model
    computes W_out · Σ_k act(children k); stored as equal copies so every runtime loads it.)

    Each output keeps exactly one of the α copies per parent, so the outgoing matrix keeps the parent's
    non-zero count; for α=2 the pattern is 2:4-compatible, and with a shared split the pair becomes α
    independent dense blocks.
    """
    r = torch.tensor(list(rows)).unsqueeze(1) % alpha
    return (torch.arange(n_cols).unsqueeze(0) % alpha) == r


def widen_blocks(
    pair: Pair,
    alpha: int,
    assignment: torch.Tensor,
    budget: int | None,
    outgoing: str = "copy",
    second: torch.Tensor | None = None,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor]]:
    """FPE on one pair, streamed as row blocks: (tensor index, first row, weights, mask); incoming tensors first.

    Exactly `budget` positions survive across the pair: the largest magnitudes, ties at the threshold broken by
    position (earlier tensor first, then row-major), so the same input always gives the same output. Blocks
    come in row order, so a writer can put each at its offset and free it: memory stays at the parent tensors.
    `budget` None keeps every expanded weight (the expansion alone, before FPE's pruning step).
    """
    out_mult = alpha if outgoing == "copy" else 1  # grouped keeps one copy per (output, parent); tied shares one
    # with overlap, entries that also go to a second child appear twice among the expanded incoming weights
    dup = [m & (second >= 0) for m in pair.m_in] if second is not None else []
    expanded_total = sum(count(m) for m in [*pair.m_in, *dup]) + out_mult * count(pair.m_out)
    if budget is None:
        budget = expanded_total
    if budget > expanded_total:
        raise FpewidenError(f"budget {budget} exceeds the {expanded_total} weights available after expansion")
    if budget < 0:
        raise FpewidenError(f"budget {budget} is negative for this layer; choose a larger --budget")
    remove = expanded_total - budget
    dtype = key_dtype([*pair.w_in, pair.w_out])
    mults = [1] * len(pair.w_in) + [out_mult]
    # magnitude keys of every parent tensor, once: the threshold search and the per-block decisions both read them
    keys = (
        [magnitude_keys(w, dtype) for w in (*pair.w_in, pair.w_out)]
        if remove
        else [torch.empty(0)] * (len(pair.w_in) + 1)
    )
    sources = list(zip(keys, [*pair.m_in, pair.m_out], mults, strict=True))
    if dup:
        sources += [(k, d, 1) for k, d in zip(keys[: len(pair.w_in)], dup, strict=True)]
    threshold, ties_left = -1, 0
    if remove:
        threshold, below = kth_key(sources, remove, dtype)
        ties_left = remove - below

    h, d = pair.w_in[0].shape
    step = _row_block(d * alpha)  # parent rows per block
    for i, (w, m) in enumerate(zip(pair.w_in, pair.m_in, strict=True)):
        for r in range(0, h, step):
            if second is None:
                block_keys = keys[i][r : r + step] if remove else keys[i]
                wide, keep, ties_left = _incoming_block(
                    w[r : r + step], block_keys, m[r : r + step], assignment[r : r + step], alpha, threshold, ties_left
                )
                yield i, r * alpha, wide, keep
                continue
            # the overlap control: an input may reach two children, so decide on the widened block itself
            extra = second[r : r + step]
            wide, mask = expand_incoming(w[r : r + step], m[r : r + step], assignment[r : r + step], alpha, extra)
            keep, ties_left = _drop(wide, mask, threshold, ties_left, dtype)
            yield i, r * alpha, wide.mul_(keep), keep
    o = pair.w_out.shape[0]
    step = _row_block(h * alpha)
    for r in range(0, o, step):
        if outgoing == "tied":  # one decision per parent weight, then the children's columns copy it
            keep, ties_left = _drop(pair.w_out[r : r + step], pair.m_out[r : r + step], threshold, ties_left, dtype)
            keep = keep.repeat_interleave(alpha, dim=1)
            yield len(pair.w_in), r, pair.w_out[r : r + step].repeat_interleave(alpha, dim=1).mul_(keep), keep
            continue
        if outgoing == "copy":
            block_keys = keys[-1][r : r + step] if remove else keys[-1]
            w_out, keep, ties_left = _copied_block(
                pair.w_out[r : r + step], block_keys, pair.m_out[r : r + step], alpha, threshold, ties_left
            )
            yield len(pair.w_in), r, w_out, keep
            continue
        w_out = pair.w_out[r : r + step].repeat_interleave(alpha, dim=1)
        m_out = pair.m_out[r : r + step].repeat_interleave(alpha, dim=1)
        if outgoing == "grouped":
            m_out &= grouped_outgoing(range(r, min(o, r + step)), h * alpha, alpha)
            w_out.mul_(m_out)
        keep, ties_left = _drop(w_out, m_out, threshold, ties_left, dtype)
        yield len(pair.w_in), r, w_out.mul_(keep), keep


def _score_keys(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`magnitude_keys` of a score tensor, as a view of it where no sign bit is set (scores are magnitudes or
    saliencies): the selection then holds no copy of every score (138 MB for a 2048→5632→2048 pair)."""
    if s.dtype == dtype and not bool(torch.signbit(s).any()):
        return s.detach().view(_KEY_VIEW[dtype])
    return magnitude_keys(s, dtype)


def keep_largest(scores: list[torch.Tensor], masks: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Keep exactly `budget` masked positions across the tensors: the largest scores (magnitudes of weights, or
    any non-negative saliency), ties broken by position as everywhere in fpewiden (the earliest go first).
    Calibrated conversion selects its masks with this; `widen_blocks` inlines the same rule block by block."""
    total = sum(count(m) for m in masks)
    if not 0 <= budget <= total:
        raise FpewidenError(f"budget {budget} is outside 0..{total}")
    remove = total - budget
    if remove == 0:
        return [m.clone() for m in masks]
    dtype = key_dtype(scores)
    sources = [(_score_keys(s, dtype), m, 1) for s, m in zip(scores, masks, strict=True)]
    threshold, below = kth_key(sources, remove, dtype)
    ties_left = remove - below
    out = []
    for s, m in zip(scores, masks, strict=True):
        keep, ties_left = _drop(s, m, threshold, ties_left, dtype)
        out.append(keep)
    return out
