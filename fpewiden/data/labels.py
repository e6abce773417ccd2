"""What labels imply: the loss each label kind trains with, and the held-out metrics of any engine's outputs."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def label_kind(y: torch.Tensor) -> str:
    """'classes' (int labels), 'multilabel' (0/1 float matrix) or 'regression' (other floats)."""
    if not y.is_floating_point():
        return "classes"
    if y.dim() == 2 and bool(((y == 0) | (y == 1)).all()):
        return "multilabel"
    return "regression"


def loss_fn(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if kind == "classes":
        return F.cross_entropy(logits, y)
    if kind == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.mse_loss(logits, y.view_as(logits))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, batch: int = 8192) -> dict[str, float]:
    """Loss and the task metric: accuracy; per-output accuracy and exact match for multi-label; MSE."""
    model.eval()
    device = next(model.parameters()).device
    logits = torch.cat([model(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])
    return metrics_from_logits(kind, logits, y)


def metrics_from_logits(kind: str, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """The held-out metrics of any engine's outputs (torch or ONNX Runtime)."""
    out = {"loss": float(loss_fn(kind, logits, y))}
    if kind == "classes":
        out["accuracy"] = float((logits.argmax(1) == y).float().mean())
    elif kind == "multilabel":
        hit = (logits > 0).float() == y
        out["accuracy"] = float(hit.float().mean())
        out["exact_match"] = float(hit.all(dim=1).float().mean())
    else:
        out["mse"] = out["loss"]
    return out
