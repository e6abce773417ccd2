"""Find the block structure that makes an FPE pair run at dense speed, from its masks alone.

A pair converted with `--split shared --outgoing grouped` has: every child c of every neuron reading only
inputs in one set S_c, and every output r reading only children of one index g(r). After permuting inputs by
S_0, S_1, … and outputs by g, the pair is α independent dense blocks: x[:, S_c] @ Win_cᵀ → act → @ Wout_cᵀ.
Stored densely those blocks are exactly the original layer's bytes, and they run as two batched MatMuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fpewiden.errors import FpewidenError


@dataclass
class Blocks:
    """A pair as α dense blocks. Shapes: w_in (α, d/α, h), b_in (α, 1, h), w_out (α, h, o/α)."""

    alpha: int
    in_perm: torch.Tensor  # (d,) inputs in block order
    out_perm: torch.Tensor  # (o,) position of each output in the block-ordered result (inverse permutation)
    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor


def _groups(owner: list[set[int]], alpha: int, size: int, what: str) -> list[list[int]]:
    """Assign each index to its one child group; indices no child uses fill the smallest groups."""
    groups: list[list[int]] = [[] for _ in range(alpha)]
    free = []
    for j, cs in enumerate(owner):
        if len(cs) > 1:
            raise FpewidenError(
                f"not a block structure: {what} {j} is used by children {sorted(cs)[:2]}; the fast layout needs "
                "a conversion with --split shared --outgoing grouped"
            )
        (groups[next(iter(cs))] if cs else free).append(j)
    for j in free:
        min(groups, key=len).append(j)
    if any(len(g) != size for g in groups):
        raise FpewidenError(
            f"the fast layout needs equal {what} groups of {size}; got sizes {[len(g) for g in groups]}"
        )
    return [sorted(g) for g in groups]


def find_blocks(
    w_in: torch.Tensor,
    m_in: torch.Tensor,
    b_in: torch.Tensor | None,
    w_out: torch.Tensor,
    m_out: torch.Tensor,
    alpha: int,
) -> Blocks:
    """`w_in` (h·α, d) and `w_out` (o, h·α) in the widened, parent-major layout fpewiden writes."""
    ha, d = w_in.shape
    o = w_out.shape[0]
    if ha % alpha or d % alpha or o % alpha:
        raise FpewidenError(f"the fast layout needs inputs ({d}) and outputs ({o}) divisible by alpha {alpha}")
    child_of_row = torch.arange(ha) % alpha
    used_in = [set() for _ in range(d)]
    for c in range(alpha):
        for j in torch.nonzero(m_in[child_of_row == c].any(0)).flatten().tolist():
            used_in[j].add(c)
    used_out = [set() for _ in range(o)]
    for c in range(alpha):
        for r in torch.nonzero(m_out[:, child_of_row == c].any(1)).flatten().tolist():
            used_out[r].add(c)
    in_groups = _groups(used_in, alpha, d // alpha, "input")
    out_groups = _groups(used_out, alpha, o // alpha, "output")
    w_in = torch.where(m_in, w_in, 0)
    w_out = torch.where(m_out, w_out, 0)
    blocks_in = torch.stack([w_in[c::alpha][:, g].T for c, g in enumerate(in_groups)])  # (α, d/α, h)
    bias = torch.zeros(ha, dtype=w_in.dtype) if b_in is None else b_in
    blocks_b = torch.stack([bias[c::alpha] for c in range(alpha)]).unsqueeze(1)  # (α, 1, h)
    blocks_out = torch.stack([w_out[g][:, c::alpha].T for c, g in enumerate(out_groups)])  # (α, h, o/α)
    order = torch.tensor([r for g in out_groups for r in g])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(o)
    return Blocks(
        alpha,
        torch.tensor([j for g in in_groups for j in g]),
        inverse,
        blocks_in.contiguous(),
        blocks_b.contiguous(),
        blocks_out.contiguous(),
    )
