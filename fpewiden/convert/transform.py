"""How one pair is converted: the interface between the pipeline and a conversion method, and the paper's
method itself (partition each neuron's inputs, copy its outgoing weights, prune the pair to its budget by
magnitude). A calibrated conversion is another transform behind the same interface.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch

from fpewiden.arch import PairSpec
from fpewiden.convert.options import ConvertOptions
from fpewiden.fpe.expand import Pair, row_counts, widen_blocks
from fpewiden.fpe.splits import (
    feature_assignment,
    group_assignment,
    grouped_assignment,
    overlap_children,
    random_assignment,
)

Block = tuple[int, int, torch.Tensor, torch.Tensor]  # (tensor index: incoming..., outgoing; first row; weights; mask)


@dataclass
class Converted:
    """A converted pair: row blocks of its matrices (neuron-major, incoming matrices first, rows in order), the
    children's biases, and the outgoing bias when the method changed it."""

    blocks: Iterable[Block]
    in_biases: list[torch.Tensor | None]
    out_bias: torch.Tensor | None = None
    short_neurons: int = 0  # neurons with fewer non-zero inputs than α (their extra children are empty)
    scales: list[torch.Tensor | None] | None = None  # per matrix, where it was quantized: (out rows, groups)


class PairTransform(Protocol):
    def __call__(
        self, k: int, spec: PairSpec, pair: Pair, budget: int | None, b_out: torch.Tensor | None = None
    ) -> Converted:
        """Convert pair number `k` (forward order) to exactly `budget` non-zeros (None: keep everything).
        `b_out` is the outgoing layer's bias, for methods that refit it. The pair is the transform's: it may
        replace or free the pair's weights and masks (the caller reads nothing of it afterwards)."""
        ...


def pair_seed(seed: int, name: str) -> int:
    """Each layer's partition depends only on the seed and the layer's name, not on which others are converted."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)


def split_biases(pair: Pair, alpha: int) -> list[torch.Tensor | None]:
    """Each child gets the parent's bias / α, so the children's pre-activations sum to the parent's."""
    return [None if b is None else (b / alpha).repeat_interleave(alpha).to(b.dtype) for b in pair.b_in]


def assignment(
    opts: ConvertOptions,
    pair: Pair,
    support: torch.Tensor,
    gen: torch.Generator,
    fan_in: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which child of each neuron receives each input, by the chosen split (`fan_in`: support's row counts)."""
    if opts.alpha == 1:  # nothing to split: expansion is the identity and the pair is magnitude-pruned
        return torch.zeros(support.shape, dtype=torch.int8)
    if opts.split == "random":
        return random_assignment(support, opts.alpha, gen, fan_in)
    if opts.split == "clause":
        assert opts.clauses is not None
        return group_assignment(support, opts.alpha, opts.clauses, gen)
    if opts.groups is not None:
        return grouped_assignment(support, opts.alpha, opts.groups, gen)
    # feature: the incoming weights' Gram matrix defines input clusters; gate and up both count for gated MLPs
    source = pair.w_in[0] if len(pair.w_in) == 1 else torch.cat([w.to(torch.float32) for w in pair.w_in], dim=0)
    return feature_assignment(source, support, opts.alpha, gen)


class FpeTransform:
    """The paper's conversion: data-free, one pair at a time, exact budget by magnitude."""

    def __init__(self, opts: ConvertOptions):
        self.opts = opts

    def __call__(
        self, k: int, spec: PairSpec, pair: Pair, budget: int | None, b_out: torch.Tensor | None = None
    ) -> Converted:
        opts = self.opts
        support = pair.support()  # one (neurons × inputs) mask, shared by the count and the splits
        fan_in = row_counts(support)
        short = int(torch.count_nonzero((fan_in > 0) & (fan_in < opts.alpha))) if opts.alpha > 1 else 0
        gen = torch.Generator().manual_seed(pair_seed(opts.seed, spec.name))
        a = assignment(opts, pair, support, gen, fan_in)
        second = overlap_children(a, support, opts.alpha, opts.overlap, gen) if opts.overlap else None
        del support
        blocks = widen_blocks(pair, opts.alpha, a, budget, opts.outgoing, second)
        return Converted(blocks, split_biases(pair, opts.alpha), None, short)
