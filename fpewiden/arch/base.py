"""The interface between architecture adapters and the FPE transform."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PairSpec:
    """Tensor names of one expandable pair.

    `in_weights` are neuron-major unless `transposed` (GPT-2's Conv1D stores (inputs, neurons) and
    (neurons, outputs)). Several incoming weights (gate and up of a gated MLP) share one partition.
    `config_key` is the dotted config.json path that holds this pair's width, for Hugging Face models.
    """

    name: str
    in_weights: tuple[str, ...]
    in_biases: tuple[str | None, ...]
    out_weight: str
    transposed: bool = False
    config_key: str | None = None
    out_bias: str | None = None  # the outgoing layer's bias (a calibrated conversion may refit it)


def natural_key(name: str) -> list[object]:
    """`layers.2` before `layers.10`; `fc1` before `fc2`."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
