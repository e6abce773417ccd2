"""`fpewiden.packed.load`: a packed checkpoint as a torch module whose packed Linear layers run the kernels.

MLP file: the chain (PackedChain: Linear layers in order, the recorded activation between them). Hugging Face
folder: the transformers model (its LM head for causal LMs, so `.generate` works), built with its parameters on
the meta device, every packed Linear (or GPT-2 Conv1D) swapped for a PackedLinear and every other tensor loaded
as stored; no dense copy of a packed matrix ever exists (except on the pure-torch fallback, which runs densely).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fpewiden.errors import FpewidenError
from fpewiden.model.chain_mlp import Chain
from fpewiden.packed.format import QUANTIZED
from fpewiden.packed.ops import PackedLinear
from fpewiden.packed.reader import PackedCheckpoint, read_packed


class DenseLinear(nn.Module):
    """A Linear layer left dense in a packed checkpoint (no zeros worth skipping)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.float32).contiguous())
        self.register_buffer("bias", bias.to(torch.float32).contiguous() if bias is not None else None)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.float32), self.weight, self.bias).to(x.dtype)


class PackedChain(Chain):
    """An MLP chain of packed (or dense) Linear layers with one activation between them."""


def _layer(pc: PackedCheckpoint, weight: str, bias: str | None, kernel: str | None) -> nn.Module:
    b = pc.get(bias) if bias else None
    rows = pc.entries[weight].rows if weight in pc.entries else None
    w = None if weight in pc.entries else pc.get(weight)
    if w is not None:
        if w.dim() != 2 or not w.is_floating_point():
            raise FpewidenError(f"{pc.path}: {weight} is not a weight matrix ({w.dtype}, shape {list(w.shape)})")
        rows = w.shape[0]
    if b is not None and (b.dim() != 1 or not b.is_floating_point() or b.shape[0] != rows):
        raise FpewidenError(f"{pc.path}: {bias} does not fit {weight} ({b.dtype}, shape {list(b.shape)})")
    return PackedLinear(pc.packed(weight), b, kernel) if w is None else DenseLinear(w, b)


def _load_mlp(pc: PackedCheckpoint, kernel: str | None) -> PackedChain:
    from fpewiden.arch.base import natural_key
    from fpewiden.model.chain_mlp import ACTIVATIONS

    names = pc.names()
    stray = [n for n in names if not n.endswith((".weight", ".bias"))]
    if stray:
        raise FpewidenError(f"{pc.path} is not a packed MLP chain: tensor {stray[0]} is neither a weight nor a bias")
    modules = sorted({n[: -len(".weight")] for n in names if n.endswith(".weight")}, key=natural_key)
    activation = pc.meta.activation or "relu"
    if activation not in ACTIVATIONS:
        raise FpewidenError(f"{pc.path}: unknown activation {activation!r} in metadata")
    layers = [_layer(pc, f"{m}.weight", f"{m}.bias" if f"{m}.bias" in names else None, kernel) for m in modules]
    for a, b in itertools.pairwise(layers):
        if a.out_features != b.in_features:
            raise FpewidenError(f"{pc.path}: layer widths do not chain ({a.out_features} into {b.in_features})")
    return PackedChain(layers, activation).eval()


def _load_hf(pc: PackedCheckpoint, kernel: str | None) -> nn.Module:
    from fpewiden.model.skeleton import assign, checkpoint_key, empty_model, meta_tensors

    model = empty_model(pc.path)
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for name in pc.names():
        key = checkpoint_key(model, name, params)
        if key is None:
            continue  # a tensor the model does not use (a head the base model lacks)
        if name in pc.entries:
            path = key[: -len(".weight")]
            parent, _, leaf = path.rpartition(".")
            old = model.get_submodule(path)
            if isinstance(old, nn.Embedding):  # an int8 table (pack --dtype int8)
                from fpewiden.packed.embedding import PackedEmbedding

                setattr(model.get_submodule(parent) if parent else model, leaf,
                        PackedEmbedding(pc.packed(name), old.padding_idx))  # fmt: skip
                continue
            bias = getattr(old, "bias", None)
            bias_name = name[: -len("weight")] + "bias"
            b = pc.get(bias_name) if bias is not None and bias_name in pc.source_file else None
            setattr(model.get_submodule(parent) if parent else model, leaf, PackedLinear(pc.packed(name), b, kernel))
        elif not (name.endswith(".bias") and name[: -len("bias")] + "weight" in pc.entries):
            t = pc.get(name)
            assign(model, key, t.to(torch.float32) if t.is_floating_point() else t)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = meta_tensors(model)
    if missing:
        raise FpewidenError(f"{pc.path} lacks tensors the model needs: {', '.join(missing[:4])}")
    return model.eval()


def load_packed(path: Path, kernel: str | None = None, tune: bool = True, activations: str | None = None) -> nn.Module:
    """See fpewiden.packed.load."""
    return module_of(read_packed(path), kernel, tune, activations)


def module_of(
    pc: PackedCheckpoint, kernel: str | None = None, tune: bool = True, activations: str | None = None
) -> nn.Module:
    """The torch module of a packed checkpoint already read (load_packed's work after the read)."""
    model = _load_mlp(pc, kernel) if pc.kind == "mlp" else _load_hf(pc, kernel)
    if activations is not None:
        for m in model.modules():
            if isinstance(m, PackedLinear) and m.values.dtype in QUANTIZED:
                m.set_activations(activations)
    if tune:
        from fpewiden.packed.crossover import tune as measure

        measure([m for m in model.modules() if isinstance(m, PackedLinear)])
    return model
