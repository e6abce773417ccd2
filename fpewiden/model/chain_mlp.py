"""The network an MLP state dict describes: Linear layers in chain order with one activation between them.

Parameters keep the state dict's names, so a trained model saves back with exactly the input's tensor names.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Chain(nn.Module):
    """Layers in order with one activation between them (not after the last): the forward every MLP chain
    shares, dense (ChainMLP) or packed (packed/loader.PackedChain)."""

    def __init__(self, layers: list[nn.Module], activation: str):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.activation = activation
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = self.act(x)
        return x


class ChainLayer(nn.Module):
    """One Linear of the chain: its own module so that FSDP can shard the chain layer by layer (a unit is a
    module whose forward runs)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().to(torch.float32).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ChainMLP(Chain):
    def __init__(self, layers: list[tuple[str, torch.Tensor, torch.Tensor | None]], activation: str = "relu"):
        """`layers`: (module name, weight, bias or None) in forward order."""
        super().__init__([ChainLayer(w, b) for _, w, b in layers], activation)
        self.names = [name for name, _, _ in layers]
        self.has_bias = [b is not None for _, _, b in layers]

    @property
    def weights(self) -> list[nn.Parameter]:
        return [layer.weight for layer in self.layers]

    @property
    def biases(self) -> list[nn.Parameter]:
        """The biases of the layers that have one, in chain order."""
        return [layer.bias for layer in self.layers if layer.bias is not None]

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

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state dict under the original names."""
        out: dict[str, torch.Tensor] = {}
        biases = iter(self.biases)
        for name, w, has_b in zip(self.names, self.weights, self.has_bias, strict=True):
            out[f"{name}.weight"] = w.detach().clone()
            if has_b:
                out[f"{name}.bias"] = next(biases).detach().clone()
        return out
