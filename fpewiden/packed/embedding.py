"""An embedding table stored as int8 rows (`pack --dtype int8`): each looked-up row dequantized on the fly, so the
table stays a quarter of its fp32 size in memory as on disk. A lookup reads a few rows; no kernel is needed."""

from __future__ import annotations

import torch
from torch import nn

from fpewiden.packed.format import PackedMatrix


class PackedEmbedding(nn.Module):
    """Replaces an nn.Embedding whose table is an int8 dense-layout matrix with one scale per row."""

    def __init__(self, pm: PackedMatrix, padding_idx: int | None = None):
        super().__init__()
        if pm.format != "dense" or pm.scales is None:
            raise ValueError("an int8 embedding table is a dense-layout int8 matrix with one scale per row")
        self.num_embeddings, self.embedding_dim = pm.rows, pm.cols
        self.padding_idx = padding_idx
        self.register_buffer("values", pm.values[: pm.rows * pm.cols].view(pm.rows, pm.cols).contiguous())
        self.register_buffer("scales", pm.scales.to(torch.float32).contiguous())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (what transformers' helpers that read `.weight` see)."""
        return self.values.to(torch.float32) * self.scales.unsqueeze(1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.values[ids].to(torch.float32) * self.scales[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"
