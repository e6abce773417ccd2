"""ONNX export of Hugging Face models through torch.onnx (torch_onnx.py).

dense:  the model as transformers runs it.
sparse: the same graph with every 2-D float initializer of density ≤ 0.5 stored as a sparse initializer.
fast:   every converted FFN (BERT-style or gated) swapped for its block form (fast.py).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fpewiden.arch import find_pairs
from fpewiden.errors import FpewidenError
from fpewiden.export.onnx_edit import Built
from fpewiden.export.torch_onnx import to_onnx
from fpewiden.model.loaded import LoadedModel

SPARSE_MAX_DENSITY = 0.5


class ModelOutput(nn.Module):
    """(input_ids, attention_mask) -> logits where the model has a head (causal LMs), else last_hidden_state;
    keyword calls the exporter cannot get wrong."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


def output_name(model: nn.Module) -> str:
    return "logits" if getattr(model, "lm_head", None) is not None else "last_hidden_state"


def _fasten(tr: LoadedModel) -> None:
    """Swap every converted FFN of `tr.model` for its fast form (in place): BERT-style and gated families."""
    from fpewiden.arch.hf import family_of
    from fpewiden.export.fast import FastPair, structures

    fam = family_of(tr.ck.config or {})
    if fam.ins[0] not in ("intermediate.dense", "mlp.gate_proj"):
        raise FpewidenError("the fast layout for Hugging Face models supports BERT-style encoders and gated MLPs")
    by_pair = structures(tr)
    t = tr.tensors()
    names = {id(p): n for n, p in tr.model.named_parameters()}
    for p in find_pairs(tr.ck):
        st = by_pair.get(p.name)
        if st is None:
            continue
        layer_path = names[id(tr.param_of[p.in_weights[0]])][: -len(f"{fam.ins[0]}.weight")].rstrip(".")
        layer = tr.model.get_submodule(layer_path) if layer_path else tr.model
        act = functools.reduce(getattr, fam.act.split("."), layer)
        w_in = [t[w] for w in p.in_weights]
        b_in = [t[b] if b else None for b in p.in_biases]
        b_out = t[p.out_bias] if p.out_bias else None
        fast = FastPair(st, w_in, b_in, t[p.out_weight], b_out, act, fam.gated)
        if fam.gated:
            layer.mlp = fast
        else:  # BertIntermediate now returns the FFN's output; BertOutput adds dropout, residual and LayerNorm
            layer.intermediate = fast
            layer.output.dense = nn.Identity()


def build_hf(tr: LoadedModel, layout: str, opset: int) -> Built:
    """The model through torch.onnx's dynamo exporter (dynamic batch and sequence axes), with verification
    inputs of another batch size and sequence length than the export's, to check the dynamic axes."""
    model = tr.model.eval()
    if layout == "fast":
        _fasten(tr)
    vocab = int((tr.ck.config or {}).get("vocab_size", 1000))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    wrapper = ModelOutput(model)
    dyn = {0: "batch", 1: "sequence"}
    proto = to_onnx(
        wrapper, (ids, mask), ["input_ids", "attention_mask"], [output_name(model)], (dyn, dyn), opset, str(tr.ck.path)
    )
    ids2 = torch.randint(vocab, (3, 9), generator=g)
    mask2 = torch.ones_like(ids2)
    mask2[2, 5:] = 0
    with torch.no_grad():
        reference = wrapper(ids2, mask2).numpy()
    feeds = {"input_ids": ids2.numpy(), "attention_mask": mask2.numpy()}
    return Built(proto, feeds, reference, output_name(model), SPARSE_MAX_DENSITY)
