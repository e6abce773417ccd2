"""FPE on one pair the plain way, all tensors at once: the definition the streaming path is tested against.

`widen_blocks` (expand.py) finds the pruning threshold on the parent tensors by a radix select and builds the
expanded tensors block by block; this module expands everything and sorts every surviving position, which is
slow and memory-hungry but obviously right. Only the tests use it.
"""

from __future__ import annotations

import torch

from fpewiden.fpe.expand import Pair, count, expand_incoming, grouped_outgoing


def expand(
    pair: Pair, alpha: int, assignment: torch.Tensor, outgoing: str = "copy", second: torch.Tensor | None = None
) -> Pair:
    """Split each neuron's incoming weights over α children by `assignment` (and `second`, the overlap control);
    copy outgoing columns (only child r mod α for output r with `grouped`); biases divided by α. No pruning."""
    wide = [expand_incoming(w, m, assignment, alpha, second) for w, m in zip(pair.w_in, pair.m_in, strict=True)]
    w_out = pair.w_out.repeat_interleave(alpha, dim=1)
    m_out = pair.m_out.repeat_interleave(alpha, dim=1)
    if outgoing == "grouped":
        m_out = m_out & grouped_outgoing(range(w_out.shape[0]), w_out.shape[1], alpha)
        w_out = w_out * m_out
    return Pair(
        [w for w, _ in wide],
        [m for _, m in wide],
        [None if b is None else (b / alpha).repeat_interleave(alpha) for b in pair.b_in],
        w_out,
        m_out,
    )


def prune(weights: list[torch.Tensor], masks: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Keep the `budget` largest magnitudes among masked positions; ties go to the later position (tensor, then
    row-major), i.e. the earliest are removed first. A stable sort on (|w|, tensor, position)."""
    total = sum(count(m) for m in masks)
    mags, order = [], []
    for t, (w, m) in enumerate(zip(weights, masks, strict=True)):
        idx = torch.nonzero(m.reshape(-1)).flatten()
        mags.append(w.reshape(-1)[idx].abs().to(torch.float64))
        order.append(torch.stack([torch.full_like(idx, t), idx], dim=1))
    mag, pos = torch.cat(mags), torch.cat(order)
    drop = pos[torch.sort(mag, stable=True).indices[: total - budget]]
    out = [m.clone() for m in masks]
    for t, j in drop.tolist():
        out[t].view(-1)[j] = False
    return out


def widen(
    pair: Pair,
    alpha: int,
    assignment: torch.Tensor,
    budget: int | None,
    outgoing: str = "copy",
    second: torch.Tensor | None = None,
) -> Pair:
    """Expand, then prune to exactly `budget` non-zeros across the pair (None: keep everything)."""
    full = expand(pair, alpha, assignment, outgoing, second)
    if budget is None:
        return full
    if outgoing == "tied":  # one outgoing weight per parent competes for the budget; children copy its fate
        masks = prune([*full.w_in, pair.w_out], [*full.m_in, pair.m_out], budget)
        masks[-1] = masks[-1].repeat_interleave(alpha, dim=1)
    else:
        masks = prune([*full.w_in, full.w_out], [*full.m_in, full.m_out], budget)
    weights = [w * m for w, m in zip([*full.w_in, full.w_out], masks, strict=True)]
    return Pair(weights[:-1], masks[:-1], full.b_in, weights[-1], masks[-1])
