"""The paper's interference metrics on incoming weights (neurons × inputs).

Feature capacity (Scherlis et al.) C_i = (W·i·W·i)² / Σ_j (W·i·W·j)²: 1 when input i has neurons to itself,
lower when it shares them. Mean |cosine| between neuron weight vectors: how alike the neurons read their inputs.
FPE should raise the first and lower the second.
"""

from __future__ import annotations

import torch

MAX_COSINE_ROWS = 4096


def feature_capacity(w: torch.Tensor) -> float:
    """Mean capacity over inputs that some neuron reads (inputs with an all-zero column are skipped)."""
    w = w.to(torch.float64)
    gram = w.T @ w
    diag = gram.diagonal()
    live = diag > 0
    if not bool(live.any()):
        return 0.0
    cap = diag[live] ** 2 / (gram[live] ** 2).sum(dim=1)
    return float(cap.mean())


def mean_abs_cosine(w: torch.Tensor, seed: int = 0) -> tuple[float, bool]:
    """Mean |cos| over pairs of distinct live neurons; above MAX_COSINE_ROWS neurons, over a seeded sample.

    Returns (value, sampled) so reports can say when the figure is an estimate.
    """
    w = w.to(torch.float32)
    norms = w.norm(dim=1)
    w = w[norms > 0] / norms[norms > 0, None]
    sampled = w.shape[0] > MAX_COSINE_ROWS
    if sampled:
        idx = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(seed))[:MAX_COSINE_ROWS]
        w = w[idx]
    n = w.shape[0]
    if n < 2:
        return 0.0, sampled
    total = 0.0
    for start in range(0, n, 1024):
        total += float((w[start : start + 1024] @ w.T).abs().sum(dtype=torch.float64))
    total -= n  # the diagonal, |cos(v, v)| = 1
    return total / (n * (n - 1)), sampled
