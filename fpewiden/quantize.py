"""Symmetric weight-only quantization: pure tensor functions, no I/O.

A weight is q · s with q an integer in [-qmax, qmax] (int8: 127, int4: 7) and s an fp32 scale shared by a row
(int8) or by a group of consecutive inputs of a row (4-bit: groups of G columns, since one scale per 4-bit row
loses too much where a row holds a few large weights). s = max |w| / qmax over what it covers, so the largest
weight is exact and zero stays exactly zero (a pruned weight is never revived, and a kept weight that rounds to 0
keeps its place in the mask). -qmax-1 is left out so q and -q are both representable (the kernels' int8 products
are symmetric). Round to nearest, ties to even (torch.round). Rows may share scales in units of α consecutive rows
(an FPE parent's children, which the packed parent layout stores as one row with one scale).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QMAX = 127
BITS = {"int8": 127, "int4": 7}  # value type -> qmax


@dataclass(frozen=True)
class Grid:
    """Which integers and which scale sharing: `qmax` (127 or 7), `group_size` (None: one scale per row), `unit`
    (rows sharing a scale: 1, or α for an FPE parent's children)."""

    qmax: int = QMAX
    group_size: int | None = None
    unit: int = 1

    def groups(self, cols: int) -> int:
        return 1 if self.group_size is None else -(-cols // self.group_size)


def peak_scales(w: torch.Tensor, qmax: int, unit: int = 1) -> torch.Tensor:
    """fp32 scales, one per row of `w` (rows, cols): max |row| / qmax, the max taken over each unit of rows; 1 for
    rows of zeros (any scale would do; 1 keeps the division finite)."""
    peak = w.detach().abs().amax(dim=1).to(torch.float32)
    if unit > 1:
        peak = peak.view(-1, unit).amax(dim=1).repeat_interleave(unit)
    return torch.where(peak > 0, peak / qmax, torch.ones_like(peak))


def scales_of(w: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round-to-nearest scales (rows, groups) for `w` on `grid`: each group's peak at once (the last group padded
    with zeros), not a slice per group."""
    rows, cols = w.shape
    if grid.group_size is None:
        return peak_scales(w, grid.qmax, grid.unit)[:, None]
    n, g = grid.groups(cols), grid.group_size
    peak = torch.nn.functional.pad(w.detach().abs().to(torch.float32), (0, n * g - cols)).view(rows, n, g).amax(2)
    if grid.unit > 1:
        peak = peak.view(-1, grid.unit, n).amax(1).repeat_interleave(grid.unit, dim=0)
    return torch.where(peak > 0, peak / grid.qmax, torch.ones_like(peak))


def expand_scales(scales: torch.Tensor, cols: int, grid: Grid) -> torch.Tensor:
    """(rows, groups) scales as (rows, cols): each column's scale."""
    if grid.group_size is None:
        return scales[:, :1].expand(-1, cols)
    return scales.repeat_interleave(grid.group_size, dim=1)[:, :cols]


def quantize(w: torch.Tensor, scales: torch.Tensor, grid: Grid) -> torch.Tensor:
    """int8 q = round(w / scale), clamped to ±qmax (`scales`: (rows, groups))."""
    q = torch.round(w.detach().to(torch.float32) / expand_scales(scales, w.shape[1], grid))
    return q.clamp_(-grid.qmax, grid.qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scales: torch.Tensor, grid: Grid) -> torch.Tensor:
    """fp32 q · scale: the weights the kernels multiply by."""
    return q.to(torch.float32) * expand_scales(scales, q.shape[1], grid)


def round_to_nearest(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` on `grid` by rounding each weight to nearest: (fp32 weights q · s, scales (rows, groups))."""
    s = scales_of(w, grid)
    return dequantize(quantize(w, s, grid), s, grid), s


def on_grid(w: torch.Tensor, scales: torch.Tensor, grid: Grid, tol: float = 1e-3) -> bool:
    """Whether every weight of `w` is an integer multiple (within `tol`) of its scale, within ±qmax: the check that
    recorded scales still describe the weights (a fine-tuned checkpoint's do not)."""
    if scales.shape != (w.shape[0], grid.groups(w.shape[1])) or not bool((scales > 0).all()):
        return False
    r = w.detach().to(torch.float32) / expand_scales(scales.to(torch.float32), w.shape[1], grid)
    return bool(((r - r.round()).abs() <= tol).all()) and bool((r.abs() <= grid.qmax + tol).all())


# int8 with one scale per row: what the packed format stores
def row_scales(w: torch.Tensor) -> torch.Tensor:
    """fp32 scales, one per row of `w` (rows, cols): max |row| / 127."""
    return peak_scales(w, QMAX)


def quantize_rows(w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 q with q[r] = round(w[r] / scales[r]), clamped to ±127."""
    return quantize(w, scales.view(-1, 1), Grid())


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 q[r] · scales[r]: the weights the kernels multiply by (one fp32 product per weight, as they do)."""
    return q.to(torch.float32) * scales.view(-1, 1)
