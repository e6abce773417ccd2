"""Calibrated quantization of one weight matrix (GPTQ: Frantar, Ashkboos, Hoefler & Alistarh 2023), with a fixed
mask (the sparse matrices fpewiden writes): pure tensor math, no I/O.

Rounding each weight to nearest (quantize.round_to_nearest) minimises the error of every weight on its own. GPTQ
minimises the error of the layer's output on calibration inputs instead: columns are quantized one at a time and
each column's rounding error is compensated in the columns not yet quantized, through the inverse of the inputs'
Gram matrix H = XᵀX. The update is SparseGPT's (fpe/solvers.obs_prune) with "round to the grid" in place of "set
to zero": pruned weights are set to zero there, kept weights to their grid point here, and both errors move the
later kept weights. The mask never changes: a pruned weight stays zero whatever the updates would give it.
"""

from __future__ import annotations

import torch

from fpewiden.quantize import Grid, peak_scales

DAMP = 0.01  # GPTQ's dampening: 1% of the Gram matrix's mean diagonal
BLOCK = 128  # columns quantized together before the rest of the matrix is updated (GPTQ's lazy batch updates)


def inverse_factor(gram: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹. Inputs that never vary (zero diagonal) get a
    unit diagonal: their weights are rounded to nearest and move no other column."""
    H = gram.to(torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    mean = float(H.diagonal().mean())
    for attempt in range(4):  # a factorisation that fails gets 10x the damping
        Hd = H.clone().double() if attempt else H.clone()
        Hd.diagonal().add_(damp * (10**attempt) * mean)
        L, info = torch.linalg.cholesky_ex(Hd)
        if not int(info):
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)
    raise RuntimeError("the calibration Gram matrix could not be factorised")


def gptq(
    w: torch.Tensor,
    mask: torch.Tensor,
    gram: torch.Tensor,
    grid: Grid,
    damp: float = DAMP,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` (rows, cols; zero where `mask` is False) on `grid`, with each column's error compensated in the later
    columns for inputs whose Gram matrix is `gram` (cols, cols). Returns (fp32 weights q · s, zero where the mask
    is; scales (rows, groups)).

    Scales: one per row from the weights as given (int8); with groups, each group's from the weights as updated
    when the group is reached (GPTQ's choice: the updates have already moved them). Rows in `grid.unit`s share
    their scales. O(cols³ + rows · cols²), like SparseGPT."""
    rows, cols = w.shape
    keep = mask.to(torch.bool)
    W = (w.to(torch.float32) * keep).clone()
    U = inverse_factor(gram, damp)
    scales = torch.empty(rows, grid.groups(cols), dtype=torch.float32)
    if grid.group_size is None:
        scales[:, 0] = peak_scales(W, grid.qmax, grid.unit)
    zero = torch.zeros((), dtype=torch.float32)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            c = i1 + i
            if grid.group_size is not None and c % grid.group_size == 0:  # a new group: its scale from W as it is now
                g = c // grid.group_size
                span = slice(i, min(i2 - i1, i + grid.group_size))
                current = torch.cat([W1[:, span], W[:, i1 + span.stop : (g + 1) * grid.group_size]], dim=1)
                scales[:, g] = peak_scales(current * keep[:, c : c + current.shape[1]], grid.qmax, grid.unit)
            s = scales[:, 0 if grid.group_size is None else c // grid.group_size]
            w_i = W1[:, i]
            q = torch.where(keep[:, c], (w_i / s).round().clamp(-grid.qmax, grid.qmax) * s, zero)
            e = (w_i - q) / U[c, c]
            W1[:, i:] -= e[:, None] * U[c, c:i2][None, :]
            W1[:, i] = q
            E1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W * keep, scales


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """‖(w − ŵ) Xᵀ‖ / ‖w Xᵀ‖ on the inputs whose Gram matrix is `gram`, from the Gram alone."""
    d = (w.to(torch.float32) - w_hat.to(torch.float32)).to(torch.float64)
    g = gram.to(torch.float64)
    num = float(((d @ g) * d).sum())
    den = float(((w.to(torch.float64) @ g) * w.to(torch.float64)).sum())
    return (max(num, 0.0) / max(den, 1e-300)) ** 0.5
