"""ONNX export of Hugging Face models through torch.onnx's torch.export-based exporter (needs onnxscript).

The TorchScript exporter (dynamo=False) traces transformers 5's attention masking wrongly: on MiniLM its ONNX
output differed from PyTorch by >1 (checked here), so it is not used.

dense:  the model as transformers runs it.
sparse: the same graph with every 2-D float initializer of density ≤ 0.5 stored as a sparse initializer.
fast:   BERT-style encoders whose FFNs were converted with --split shared --outgoing grouped: each FFN runs as
        α dense blocks (input Gather, two batched MatMuls, output Gather) holding the original FFN's bytes.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from fpewiden.arch import find_pairs
from fpewiden.errors import FpewidenError
from fpewiden.export.onnx_edit import Built
from fpewiden.export.structure import Blocks, find_blocks
from fpewiden.model.loaded import LoadedModel

SPARSE_MAX_DENSITY = 0.5


class BlockIntermediate(nn.Module):
    """x (B, T, d) -> α activated children groups, each (B, T, h): per block a Linear-shaped MatMul + bias.

    Separate per-block MatMuls with 1-D biases keep ONNX Runtime's MatMul+Add+GELU fusions, which a batched
    (α, ...) MatMul with Transposes loses (measured slower; bench/results/README.md).
    """

    def __init__(self, blocks: Blocks, act: nn.Module):
        super().__init__()
        self.split = blocks.w_in.shape[1]
        self.register_buffer("in_perm", blocks.in_perm.clone())
        self.w = nn.ParameterList([nn.Parameter(w.clone()) for w in blocks.w_in])  # α × (d/α, h)
        self.b = nn.ParameterList([nn.Parameter(b[0].clone()) for b in blocks.b_in])  # α × (h,)
        self.act = act

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        parts = x.index_select(2, self.in_perm).split(self.split, dim=2)
        return [self.act(torch.matmul(p, w) + b) for p, w, b in zip(parts, self.w, self.b, strict=True)]


class BlockOutput(nn.Module):
    """α groups (B, T, h) -> (B, T, o): each output group reads its children group only."""

    def __init__(self, blocks: Blocks, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("out_perm", blocks.out_perm.clone())
        self.w = nn.ParameterList([nn.Parameter(w.clone()) for w in blocks.w_out])  # α × (h, o/α)
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None

    def forward(self, groups: list[torch.Tensor]) -> torch.Tensor:
        y = torch.cat([torch.matmul(t, w) for t, w in zip(groups, self.w, strict=True)], dim=2)
        y = y.index_select(2, self.out_perm)
        return y + self.bias if self.bias is not None else y


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


def _blockify(tr: LoadedModel) -> None:
    """Swap every BERT FFN of `tr.model` for its block form (in place)."""
    alpha = tr.ck.meta.alpha
    if alpha is None:
        raise FpewidenError("the fast layout is for FPE conversions (this checkpoint has no fpewiden metadata)")
    layers = getattr(getattr(tr.model, "encoder", None), "layer", None)
    if layers is None or not all(hasattr(x, "intermediate") and hasattr(x, "output") for x in layers):
        raise FpewidenError("the fast layout for Hugging Face models supports BERT-style encoders")
    pairs = {p.name: p for p in find_pairs(tr.ck)}
    t = tr.tensors()
    for i, layer in enumerate(layers):
        p = next(v for k, v in pairs.items() if k.endswith(f"layer.{i}"))
        w_in, w_out = t[p.in_weights[0]], t[p.out_weight]
        m_in = tr.masks.get(p.in_weights[0], w_in != 0)
        m_out = tr.masks.get(p.out_weight, w_out != 0)
        b_in = t[p.in_biases[0]] if p.in_biases[0] else None
        blocks = find_blocks(w_in, m_in, b_in, w_out, m_out, alpha)
        layer.intermediate = BlockIntermediate(blocks, layer.intermediate.intermediate_act_fn)
        layer.output.dense = BlockOutput(blocks, layer.output.dense.bias.detach())


def build_hf(tr: LoadedModel, layout: str, opset: int) -> Built:
    """The model through torch.onnx's dynamo exporter (dynamic batch and sequence axes), with verification
    inputs of another batch size and sequence length than the export's, to check the dynamic axes."""
    model = tr.model.eval()
    if layout == "fast":
        _blockify(tr)
    vocab = int((tr.ck.config or {}).get("vocab_size", 1000))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    wrapper = ModelOutput(model)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        # the exporter prints its progress on stdout; keep stdout for fpewiden's own report
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
                torch.onnx.export(
                    wrapper,
                    (ids, mask),
                    str(path),
                    input_names=["input_ids", "attention_mask"],
                    output_names=[output_name(model)],
                    dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                    opset_version=opset,
                    dynamo=True,
                    external_data=True,
                    verbose=False,
                )
            except Exception as e:  # the exporter's failures are many and varied; name it in one line
                raise FpewidenError(
                    f"torch.onnx cannot export {tr.ck.path}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}"
                ) from None
        proto = onnx.load(str(path))  # with the exporter's external data, if any, into memory
    ids2 = torch.randint(vocab, (3, 9), generator=g)
    mask2 = torch.ones_like(ids2)
    mask2[2, 5:] = 0
    with torch.no_grad():
        reference = wrapper(ids2, mask2).numpy()
    feeds = {"input_ids": ids2.numpy(), "attention_mask": mask2.numpy()}
    return Built(proto, feeds, reference, output_name(model), SPARSE_MAX_DENSITY)
