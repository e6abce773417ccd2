"""Supervised tasks over tensors: the loss each label kind implies, and held-out metrics."""

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


class SupervisedTask:
    """(x, y) in memory; batches are index tensors into it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, kind: str):
        self.x, self.y, self.x_val, self.y_val, self.kind = x, y, x_val, y_val, kind
        self.n_train = len(x)
        self._on: torch.device | None = None

    def _to(self, device: torch.device) -> None:
        if self._on != device:
            self.x, self.y = self.x.to(device), self.y.to(device)
            self._on = device

    def loss(self, model: nn.Module, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        self._to(device)
        idx = idx.to(device)
        return loss_fn(self.kind, model(self.x[idx]), self.y[idx])

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return evaluate(model, self.x_val, self.y_val, self.kind)
