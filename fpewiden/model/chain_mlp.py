"""The network an MLP state dict describes: Linear layers in chain order with one activation between them.

Parameters keep the state dict's names, so a trained model saves back with exactly the input's tensor names.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class ChainMLP(nn.Module):
    def __init__(self, layers: list[tuple[str, torch.Tensor, torch.Tensor | None]], activation: str = "relu"):
        """`layers`: (module name, weight, bias or None) in forward order."""
        super().__init__()
        self.names = [name for name, _, _ in layers]
        self.weights = nn.ParameterList([nn.Parameter(w.detach().to(torch.float32).clone()) for _, w, _ in layers])
        self.has_bias = [b is not None for _, _, b in layers]
        self.biases = nn.ParameterList(
            [nn.Parameter(b.detach().to(torch.float32).clone()) for _, _, b in layers if b is not None]
        )
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    @staticmethod
    def fresh(widths: list[int], activation: str = "relu", seed: int = 0) -> ChainMLP:
        """A dense MLP with PyTorch's default Linear init; names follow nn.Sequential (`0`, `2`, `4`, …)."""
        torch.manual_seed(seed)
        layers = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            lin = nn.Linear(a, b)
            layers.append((str(2 * i), lin.weight.data, lin.bias.data))
        return ChainMLP(layers, activation)

    def named_weights(self) -> dict[str, nn.Parameter]:
        return {f"{n}.weight": w for n, w in zip(self.names, self.weights, strict=True)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biases = iter(self.biases)
        last = len(self.weights) - 1
        for i, (w, has_b) in enumerate(zip(self.weights, self.has_bias, strict=True)):
            x = F.linear(x, w, next(biases) if has_b else None)
            if i < last:
                x = self.act(x)
        return x

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state dict under the original names."""
        out: dict[str, torch.Tensor] = {}
        biases = iter(self.biases)
        for name, w, has_b in zip(self.names, self.weights, self.has_bias, strict=True):
            out[f"{name}.weight"] = w.detach().clone()
            if has_b:
                out[f"{name}.bias"] = next(biases).detach().clone()
        return out
