"""A pair's function on calibration data, in token chunks: the pre-activations and activations of its neurons
and its output (`PairFunction`: the activation, gated or not). Everything at the pair's width is computed
`chunk_rows` tokens at a time, so a pair's peak does not grow with tokens × neurons.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fpewiden.fpe.expand import Pair

Activation = Callable[[torch.Tensor], torch.Tensor]
Rows = Callable[[slice], torch.Tensor]  # a tensor's rows for a range of tokens, computed when asked for

# Tokens are worked through in chunks whose fp32 rows at the pair's widest point (its neurons, α× when widened)
# take about this much: what is held over all tokens stays at the model's width (inputs, targets), so a pair's
# peak no longer grows with tokens × FFN width (bench/results/calibration_memory).
CHUNK_BYTES = 16 << 20


def chunk_rows(width: int) -> int:
    """Tokens per chunk at this width (at least 256)."""
    return max(256, CHUNK_BYTES // (4 * max(1, width)))


def token_slices(lo: int, hi: int, size: int) -> list[slice]:
    return [slice(i, min(hi, i + size)) for i in range(lo, hi, max(1, size))]


@dataclass(frozen=True)
class PairFunction:
    """How the pair computes: `act(W_in x + b)`, or `act(gate x) * (up x)` for gated MLPs (two incoming)."""

    act: Activation
    gated: bool = False


def pre_activations(pair: Pair, x: torch.Tensor) -> list[torch.Tensor]:
    """(tokens × neurons) per incoming matrix, biases included."""
    out = []
    for w, b in zip(pair.w_in, pair.b_in, strict=True):
        h = x @ w.to(x.dtype).T
        out.append(h + b.to(x.dtype) if b is not None else h)
    return out


def activations(pre: list[torch.Tensor], fn: PairFunction) -> torch.Tensor:
    return fn.act(pre[0]) * pre[1] if fn.gated else fn.act(pre[0])


def pair_output(pair: Pair, x: torch.Tensor, fn: PairFunction, b_out: torch.Tensor | None) -> torch.Tensor:
    y = activations(pre_activations(pair, x), fn) @ pair.w_out.to(x.dtype).T
    return y + b_out.to(x.dtype) if b_out is not None else y


def derivative(act: Activation, h: torch.Tensor) -> torch.Tensor:
    """act'(h) elementwise, by autograd (every supported activation is elementwise)."""
    h = h.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(act(h).sum(), h)
    return g
