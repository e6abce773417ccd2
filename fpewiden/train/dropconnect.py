"""DropConnect (Wan et al., 2013): a fresh random mask over the weights at every training step.

The paper compares FPE with DropConnect at the same budget; this is the baseline's training-time half. Each step
keeps every weight with probability 1 - p and scales the kept ones by 1 / (1 - p) ("inverted" DropConnect, as
inverted dropout), so the deployed model uses its weights as they are and has exactly the non-zeros it was
trained with — the comparison stays at equal non-zeros. Biases are not dropped.

Implemented on the parameters in place rather than with a parametrization, so the model's parameters, state
dict and masks are untouched: before the forward pass W is stashed and replaced by W·M/(1-p); after the backward
pass the gradient (taken at the dropped weights) is multiplied by M/(1-p), which is the chain rule for W, and W
is restored. Fixed zero patterns compose: a pruned weight stays zero whatever M is. Masks come from a generator
seeded by (seed, epoch), so a run resumed at an epoch boundary draws the same masks as one never stopped, and
every DDP rank draws the same mask (like one large batch).
"""

from __future__ import annotations

import torch
from torch import nn


class DropConnect:
    def __init__(self, params: list[nn.Parameter], p: float) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropConnect probability must be in [0, 1), got {p}")
        self.params, self.p = params, p
        self.gen: torch.Generator | None = None
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def active(self) -> bool:
        return self.p > 0.0 and bool(self.params)

    def start_epoch(self, seed: int) -> None:
        """Masks of an epoch come from its seed alone (the trainer's `epoch_seed`)."""
        if not self.active:
            return
        self.gen = torch.Generator(device=self.params[0].device)
        self.gen.manual_seed(seed)

    @torch.no_grad()
    def drop(self) -> None:
        """Before the forward pass: W ← W·M/(1-p) with a fresh M."""
        if not self.active:
            return
        assert self.gen is not None, "start_epoch first"
        keep = 1.0 - self.p
        self._saved = []
        for w in self.params:
            scale = torch.empty_like(w).bernoulli_(keep, generator=self.gen).div_(keep)
            self._saved.append((w.detach().clone(), scale))
            w.mul_(scale)

    @torch.no_grad()
    def restore(self) -> None:
        """After the backward pass: gradient ← gradient·M/(1-p); W restored."""
        if not self.active:
            return
        for w, (orig, scale) in zip(self.params, self._saved, strict=True):
            if w.grad is not None:
                w.grad.mul_(scale)
            w.copy_(orig)
        self._saved = []
