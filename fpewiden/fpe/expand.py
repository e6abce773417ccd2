"""Fixed Parameter Expansion of one expandable pair, and exact-budget magnitude pruning.

Conventions: incoming matrices are neuron-major, shape (neurons, inputs); the outgoing matrix is (outputs, neurons).
A gated MLP has several incoming matrices (gate and up) that share one partition. Children of neuron i are rows
i·α … i·α+α−1 (parent-major), the same order for biases and outgoing columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fpewiden.errors import FpewidenError


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
        return sum(int(m.sum()) for m in self.m_in) + int(self.m_out.sum())

    def support(self) -> torch.Tensor:
        """Inputs a neuron reads in any incoming matrix: what its children partition."""
        s = self.m_in[0].clone()
        for m in self.m_in[1:]:
            s |= m
        return s


def check_fan_in(support: torch.Tensor, alpha: int) -> None:
    """α children need at least α inputs to split; a neuron with none is dead and stays dead."""
    fan_in = support.sum(dim=1)
    bad = torch.nonzero((fan_in > 0) & (fan_in < alpha)).flatten()
    if len(bad):
        i = int(bad[0])
        raise FpewidenError(
            f"alpha {alpha} exceeds the non-zero fan-in {int(fan_in[i])} of neuron {i} "
            f"({len(bad)} neuron(s) affected); use a smaller --alpha"
        )


def expand(pair: Pair, alpha: int, assignment: torch.Tensor) -> Pair:
    """Split each neuron's incoming weights over α children by `assignment`; copy outgoing columns.

    Values are never changed: child c of neuron i keeps W[i, j] exactly where assignment[i, j] == c and the
    parent had it. Biases are divided by α so the children's pre-activations sum to the parent's.
    """
    h = pair.neurons
    children = torch.arange(alpha, dtype=torch.int8).view(1, alpha, 1)
    take = assignment.unsqueeze(1) == children  # (h, α, d)
    w_in, m_in, b_in = [], [], []
    for w, m, b in zip(pair.w_in, pair.m_in, pair.b_in, strict=True):
        mask = (m.unsqueeze(1) & take).reshape(h * alpha, -1)
        w_in.append(torch.where(mask, w.unsqueeze(1).expand(-1, alpha, -1).reshape(h * alpha, -1), 0).to(w.dtype))
        m_in.append(mask)
        b_in.append(None if b is None else (b / alpha).repeat_interleave(alpha))
    w_out = pair.w_out.repeat_interleave(alpha, dim=1)
    m_out = pair.m_out.repeat_interleave(alpha, dim=1)
    return Pair(w_in, m_in, b_in, w_out, m_out)


def prune_to_budget(weights: list[torch.Tensor], masks: list[torch.Tensor], budget: int) -> list[torch.Tensor]:
    """Keep exactly `budget` positions of the masks, the largest magnitudes; return the new masks.

    Ties at the threshold are broken by position: the earliest (tensor order, then row-major) go first, so the
    same input always gives the same output.
    """
    total = sum(int(m.sum()) for m in masks)
    if budget > total:
        raise FpewidenError(f"budget {budget} exceeds the {total} weights available after expansion")
    if budget < 0:
        raise FpewidenError(f"budget {budget} is negative for this layer; choose a larger --budget")
    remove = total - budget
    if remove == 0:
        return [m.clone() for m in masks]
    mags = torch.cat([w.detach().abs().to(torch.float32)[m] for w, m in zip(weights, masks, strict=True)])
    threshold = mags.kthvalue(remove).values
    del mags
    out = []
    removed = 0
    for w, m in zip(weights, masks, strict=True):
        mag = w.detach().abs().to(torch.float32)
        out.append(m & (mag >= threshold))
        removed += int((m & (mag < threshold)).sum())
    ties_to_remove = remove - removed
    for w, keep in zip(weights, out, strict=True):
        if ties_to_remove == 0:
            break
        flat = keep.view(-1)
        ties = torch.nonzero(flat & (w.detach().abs().to(torch.float32).view(-1) == threshold)).flatten()
        drop = ties[:ties_to_remove]
        flat[drop] = False
        ties_to_remove -= len(drop)
    return out


def widen(pair: Pair, alpha: int, assignment: torch.Tensor, budget: int) -> Pair:
    """FPE on one pair: expand by `assignment`, then prune the pair's weights to exactly `budget` non-zeros."""
    wide = expand(pair, alpha, assignment)
    weights = [*wide.w_in, wide.w_out]
    masks = prune_to_budget(weights, [*wide.m_in, wide.m_out], budget)
    pruned = [torch.where(m, w, 0).to(w.dtype) for w, m in zip(weights, masks, strict=True)]
    return Pair(pruned[:-1], masks[:-1], wide.b_in, pruned[-1], masks[-1])
