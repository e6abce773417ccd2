"""Sentence embeddings from token states: the mean over the tokens the attention mask keeps (padding excluded),
as sentence-transformers pools MiniLM. One definition for distillation, embedding datasets and benchmarks."""

from __future__ import annotations

import torch


def mean_pool(hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, width) states and a (batch, tokens) 0/1 mask -> (batch, width)."""
    w = attention.unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1e-9)
