"""Which layers form expandable pairs, per model family. One adapter per family; the transforms never care."""

from __future__ import annotations

from fpewiden.arch.base import PairSpec
from fpewiden.arch.chain import find_mlp_pairs
from fpewiden.arch.hf import find_hf_pairs
from fpewiden.io.checkpoint import Checkpoint


def find_pairs(ck: Checkpoint) -> list[PairSpec]:
    """Every expandable pair in the checkpoint, in forward order."""
    return find_hf_pairs(ck) if ck.kind == "hf" else find_mlp_pairs(ck)


__all__ = ["PairSpec", "find_pairs"]
