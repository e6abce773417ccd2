"""Pack a model in memory: every Linear (or GPT-2 Conv1D) of a torch module whose weight a packed format makes
smaller becomes a PackedLinear. What bench runs as its `packed` engine, from the checkpoint it already loaded."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from fpewiden.packed import format as fmt
from fpewiden.packed.ops import PackedLinear


def pack_linears(
    model: nn.Module,
    alphas: dict[int, int] | None = None,
    dtype: torch.dtype | None = None,
    kernel: str | None = None,
) -> dict[str, fmt.PackedMatrix]:
    """Swap, in place, each Linear/Conv1D whose packed weight is smaller than dense; returns the packed matrices
    by module path. `alphas`: id(weight parameter) -> α for FPE-widened incoming matrices (the parent format)."""
    alphas = alphas or {}
    done: dict[str, fmt.PackedMatrix] = {}
    for path, mod in list(model.named_modules()):
        conv1d = type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")
        if not (isinstance(mod, nn.Linear) or conv1d) or mod.weight.device.type == "meta":
            continue
        w = mod.weight.detach()
        w = (w.T if conv1d else w).contiguous().to(dtype or w.dtype)
        pm = fmt.best(w, dtype, alphas.get(id(mod.weight)))
        if pm is None:
            continue
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, PackedLinear(pm, mod.bias, kernel))
        done[path] = pm
    from fpewiden.packed.crossover import tune

    tune([m for m in model.modules() if isinstance(m, PackedLinear)])
    return done


def packed_chain(
    layers: list[tuple[torch.Tensor, torch.Tensor | None, int | None]], activation: str, kernel: str | None = None
) -> tuple[nn.Module, list[fmt.PackedMatrix | None]]:
    """An MLP chain from (weight, bias, α or None) per Linear: packed where smaller, dense elsewhere."""
    from fpewiden.packed.loader import DenseLinear, PackedChain

    modules: list[nn.Module] = []
    packed: list[fmt.PackedMatrix | None] = []
    for w, b, alpha in layers:
        pm = fmt.best(w.detach(), None, alpha)
        modules.append(PackedLinear(pm, b, kernel) if pm is not None else DenseLinear(w.detach(), b))
        packed.append(pm)
    for a, b in itertools.pairwise(modules):
        assert a.out_features == b.in_features
    from fpewiden.packed.crossover import tune

    tune([m for m in modules if isinstance(m, PackedLinear)])
    return PackedChain(modules, activation).eval(), packed
