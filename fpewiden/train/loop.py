"""The mask-preserving training loop: short enough to read in one sitting.

A masked weight's gradient is zeroed before the optimizer step (so Adam's moments never accumulate there) and
the mask is re-applied after it (so weight decay or momentum cannot revive a pruned position): the zero
pattern is identical, bit for bit, before and after training.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    if kind == "classes":
        return F.cross_entropy(logits, y)
    if kind == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.mse_loss(logits, y.view_as(logits))


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, batch: int = 4096) -> dict[str, float]:
    """Loss and the task metric: accuracy; per-output accuracy and exact match for multi-label; MSE."""
    model.eval()
    logits = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
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


@dataclass
class FitConfig:
    epochs: int = 20
    lr: float = 1e-2
    batch_size: int = 128
    weight_decay: float = 0.0
    seed: int = 0


def apply_masks(masks: dict[nn.Parameter, torch.Tensor]) -> None:
    with torch.no_grad():
        for p, m in masks.items():
            p.mul_(m)


def fit(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: FitConfig,
    masks: dict[nn.Parameter, torch.Tensor] | None = None,
) -> list[dict[str, float]]:
    """Adam on (x, y), evaluated on (x_val, y_val) after every epoch; returns the per-epoch history."""
    x, y, x_val, y_val = data
    kind = label_kind(y)
    masks = masks or {}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    apply_masks(masks)
    history = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = loss_fn(kind, model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, m in masks.items():
                if p.grad is not None:
                    p.grad.mul_(m)
            opt.step()
            apply_masks(masks)
        history.append({"epoch": epoch + 1, **evaluate(model, x_val, y_val, kind)})
    return history
