"""A checkpoint as a trainable torch module, with its zero pattern as explicit masks, and back to tensors.

MLP state dicts become a ChainMLP; Hugging Face directories load with transformers' AutoModel. Masks come from
the checkpoint's stored masks; without them, a weight matrix that holds exact zeros is treated as pruned (its
zeros stay zero) and a matrix without zeros trains densely: the dense baseline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fpewiden.arch import find_pairs
from fpewiden.arch.chain import linear_layers
from fpewiden.errors import FpewidenError
from fpewiden.io.checkpoint import Checkpoint, open_checkpoint, pack_mask
from fpewiden.model.chain_mlp import ACTIVATIONS, ChainMLP
from fpewiden.model.skeleton import has_lm_head


@dataclass
class LoadedModel:
    ck: Checkpoint
    model: nn.Module
    param_of: dict[str, nn.Parameter]  # checkpoint tensor name -> parameter
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint tensor name -> bool mask
    activation: str = "relu"

    def mask_map(self) -> dict[nn.Parameter, torch.Tensor]:
        return {self.param_of[n]: m for n, m in self.masks.items()}

    def ties(self) -> list[tuple[nn.Parameter, int, int]]:
        """(parameter, α, dim) of every tied outgoing matrix (`--outgoing tied`): groups of α neighbours along
        `dim` are one shared weight (dim 1 for Linear, 0 for GPT-2's transposed Conv1D)."""
        transposed = {p["out"]: p.get("transposed", False) for p in self.ck.meta.pairs or []}
        return [
            (self.param_of[n], alpha, 0 if transposed.get(n) else 1)
            for n, alpha in self.ck.meta.tied().items()
            if n in self.param_of
        ]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu() for n, p in self.param_of.items()}

    def packed_masks(self) -> dict[str, torch.Tensor]:
        return {n: pack_mask(m.cpu()) for n, m in self.masks.items()}

    @property
    def n_inputs(self) -> int | None:
        if isinstance(self.model, ChainMLP):
            return self.model.weights[0].shape[1]
        return None

    @property
    def n_outputs(self) -> int | None:
        if isinstance(self.model, ChainMLP):
            return self.model.weights[-1].shape[0]
        return None


def _mask_for(ck: Checkpoint, name: str, t: torch.Tensor) -> torch.Tensor | None:
    stored = ck.mask(name)
    if stored is not None:
        return stored
    zeros = t == 0
    return ~zeros if bool(zeros.any()) else None


def load_model(path: Path, head: bool = False) -> LoadedModel:
    """`head`: load causal language models with their LM head (for logits); otherwise the base model."""
    ck = open_checkpoint(path)
    return _load_hf(ck, head) if ck.kind == "hf" else _load_mlp(ck)


def load_skeleton(path: Path) -> tuple[LoadedModel, list[str]] | None:
    """The model `load_model` gives, with every parameter on the meta device (nothing read, nothing allocated),
    and the checkpoint names of the matrices that may carry masks: for a loader that fills each rank's shard
    straight from the checkpoint (train/fsdp.py `load_shards`). Masks are left to it (a shard's own). None where
    the checkpoint lacks some parameter of the model (transformers would initialise it: load_model does that)."""
    ck = open_checkpoint(path)
    if ck.kind == "mlp":
        tr = _chain(ck, lambda name: torch.empty(ck.shapes[name], device="meta"))
        return tr, list(tr.model.named_weights())
    from fpewiden.model.skeleton import empty_model

    model = empty_model(ck.path, head=False)
    param_of = _param_of(ck, model)
    if len({id(p) for p in param_of.values()}) < len(dict(model.named_parameters())):
        return None
    return LoadedModel(ck, model, param_of, {}, _hf_activation(ck)), _pair_weights(ck, param_of)


def masks_of(ck: Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
    """The masks `load_model` finds for these matrices (stored, or a matrix's zeros), one tensor read at a time."""
    out = {}
    for name in names:
        m = _mask_for(ck, name, ck.get(name))
        if m is not None:
            out[name] = m
    return out


def _pair_weights(ck: Checkpoint, param_of: dict[str, nn.Parameter]) -> list[str]:
    """The checkpoint names of the pairs' matrices the model has: the ones that may carry masks."""
    return [n for p in find_pairs(ck) for n in (*p.in_weights, p.out_weight) if n in param_of]


def _param_of(ck: Checkpoint, model: nn.Module) -> dict[str, nn.Parameter]:
    """Checkpoint tensor name -> the Hugging Face model's parameter (checkpoints of a model with a head prefix
    the base model's names)."""
    from fpewiden.model.skeleton import checkpoint_key

    params = dict(model.named_parameters())
    keys = {n: checkpoint_key(model, n, params) for n in ck.shapes}
    return {n: params[k] for n, k in keys.items() if k is not None}


def _hf_activation(ck: Checkpoint) -> str:
    return json.dumps(ck.config.get("hidden_act", "")) if ck.config else ""


def _chain(ck: Checkpoint, tensor) -> LoadedModel:
    """The ChainMLP of an MLP checkpoint, its tensors from `tensor(name)` (read, or empty on meta); no masks."""
    find_pairs(ck)  # validates the chain with the same messages as convert
    activation = ck.meta.activation or "relu"
    if activation not in ACTIVATIONS:
        raise FpewidenError(f"{ck.path}: unknown activation {activation!r} in metadata")
    layers = [(m, tensor(w), tensor(b) if b else None) for m, w, b in linear_layers(ck)]
    model = ChainMLP(layers, activation)
    param_of: dict[str, nn.Parameter] = dict(model.named_weights())
    for (_m, _, b), layer in zip(linear_layers(ck), model.layers, strict=True):
        if b:
            param_of[b] = layer.bias
    return LoadedModel(ck, model, param_of, {}, activation)


def _load_mlp(ck: Checkpoint) -> LoadedModel:
    tr = _chain(ck, ck.get)
    tr.masks = masks_of(ck, list(tr.model.named_weights()))
    return tr


def _load_hf(ck: Checkpoint, head: bool = False) -> LoadedModel:
    try:
        import transformers
    except ImportError:
        raise FpewidenError("Hugging Face checkpoints need transformers: pip install 'fpewiden[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    auto = transformers.AutoModelForCausalLM if head and has_lm_head(ck.config or {}) else transformers.AutoModel
    try:
        model = auto.from_pretrained(str(ck.path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FpewidenError(f"transformers cannot load {ck.path}: {str(e).splitlines()[0]}") from None
    model = model.float()
    param_of = _param_of(ck, model)
    return LoadedModel(ck, model, param_of, masks_of(ck, _pair_weights(ck, param_of)), _hf_activation(ck))
