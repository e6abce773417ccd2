"""Symmetric weight-only quantization to int8: pure tensor functions, no I/O.

One scale per row (per output feature, as in y = W x): weight ≈ q · s with q an integer in [-127, 127] and
s = max |row| / 127, so the largest weight of each row is exact and zero stays exactly zero (a pruned weight is
never revived, and a kept weight that rounds to 0 keeps its place in the mask). -128 is left out so q and -q are
both representable (the kernels' int8 products are symmetric). Round to nearest, ties to even (torch.round).
"""

from __future__ import annotations

import torch

QMAX = 127


def row_scales(w: torch.Tensor) -> torch.Tensor:
    """fp32 scales, one per row of `w` (rows, cols): max |row| / 127, and 1 for a row of zeros (any scale would do;
    1 keeps the division finite)."""
    peak = w.detach().abs().amax(dim=1).to(torch.float32)
    return torch.where(peak > 0, peak / QMAX, torch.ones_like(peak))


def quantize_rows(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 q with q[r] = round(w[r] / scales[r]), clamped to ±127."""
    q = torch.round(w.detach().to(torch.float32) / scales.view(-1, 1))
    return q.clamp_(-QMAX, QMAX).to(torch.int8)


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 q[r] · scales[r]: the weights the kernels multiply by (one fp32 product per weight, as they do)."""
    return q.to(torch.float32) * scales.view(-1, 1)
