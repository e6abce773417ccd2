"""Plain MLP state dicts: consecutive Linear weights whose shapes chain form the network."""

from __future__ import annotations

import itertools

from fpewiden.arch.base import PairSpec, natural_key
from fpewiden.errors import FpewidenError
from fpewiden.io.checkpoint import Checkpoint


def linear_layers(ck: Checkpoint) -> list[tuple[str, str, str | None]]:
    """(module name, weight key, bias key or None) for each Linear, in forward order."""
    modules = []
    for name, shape in ck.shapes.items():
        if name.endswith(".weight") and len(shape) == 2:
            modules.append(name[: -len(".weight")])
        elif not (name.endswith(".bias") and len(shape) == 1):
            raise FpewidenError(
                f"{ck.path} is not a plain MLP state dict: tensor {name} {list(shape)} is neither a Linear "
                "weight nor a bias (for Hugging Face models pass the model directory)"
            )
    modules.sort(key=natural_key)
    layers = []
    for m in modules:
        bias = f"{m}.bias" if f"{m}.bias" in ck.shapes else None
        if bias and ck.shapes[bias][0] != ck.shapes[f"{m}.weight"][0]:
            raise FpewidenError(
                f"{bias} has {ck.shapes[bias][0]} entries but {m}.weight has {ck.shapes[f'{m}.weight'][0]} rows"
            )
        layers.append((m, f"{m}.weight", bias))
    return layers


def find_mlp_pairs(ck: Checkpoint) -> list[PairSpec]:
    layers = linear_layers(ck)
    if len(layers) < 2:
        raise FpewidenError(
            f"no expandable layer found in {ck.path}: an MLP needs at least two chained Linear weights "
            f"(found {len(layers)})"
        )
    for (_, w_a, _), (_, w_b, _) in itertools.pairwise(layers):
        out_a, in_b = ck.shapes[w_a][0], ck.shapes[w_b][1]
        if out_a != in_b:
            sa, sb = ck.shapes[w_a], ck.shapes[w_b]
            raise FpewidenError(
                f"shapes don't chain: {w_a} {sa[0]}x{sa[1]} gives {out_a} features but {w_b} {sb[0]}x{sb[1]} "
                f"reads {in_b}"
            )
    return [
        PairSpec(name=m, in_weights=(w,), in_biases=(b,), out_weight=nxt[1], out_bias=nxt[2])
        for (m, w, b), nxt in itertools.pairwise(layers)
    ]
