"""A supervised task held in memory, as the trainer sees it: a loss on a batch of indices, held-out metrics."""

from __future__ import annotations

import torch
from torch import nn

from fpewiden.data.labels import evaluate, loss_fn


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
