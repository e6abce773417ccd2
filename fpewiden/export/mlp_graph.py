"""ONNX graphs for MLP checkpoints, built node by node so every layout's operators and bytes are explicit.

dense: MatMul(x, Wᵀ) + b per layer, weights as plain fp32 initializers: the honest baseline.
fast:  each FPE pair as α dense blocks between one input Gather and one output Gather (see structure.py).
Sparse storage and fp16 storage are edits of the finished graph (onnx_edit.py), shared with Hugging Face models.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fpewiden.arch import find_pairs
from fpewiden.errors import FpewidenError
from fpewiden.export.onnx_edit import Built
from fpewiden.export.structure import Blocks, find_blocks
from fpewiden.model.loaded import LoadedModel

LAYOUTS = ("dense", "sparse", "fast")


class GraphBuilder:
    def __init__(self, opset: int):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self._n = 0

    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(self, array: np.ndarray, base: str) -> str:
        """An integer or shape constant: always a plain initializer."""
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, t: torch.Tensor, base: str) -> str:
        """A float weight as an fp32 initializer."""
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(t.detach().to(torch.float32).numpy(), name))
        return name

    def activation(self, x: str, act: str) -> str:
        if act == "relu":
            return self.node("Relu", [x])
        if act == "tanh":
            return self.node("Tanh", [x])
        if act == "silu":
            return self.node("Mul", [x, self.node("Sigmoid", [x])])
        if act == "gelu":  # exact GELU: 0.5 x (1 + erf(x / sqrt 2)), valid at every opset we emit
            half = self.const(np.array(0.5, np.float32), "half")
            one = self.const(np.array(1.0, np.float32), "one")
            rsqrt2 = self.const(np.array(1 / np.sqrt(2), np.float32), "rsqrt2")
            erf = self.node("Erf", [self.node("Mul", [x, rsqrt2])])
            return self.node("Mul", [self.node("Mul", [x, half]), self.node("Add", [erf, one])])
        raise FpewidenError(f"activation {act!r} cannot be exported")

    def model(self, x: str, n_in: int, n_out: int) -> onnx.ModelProto:
        """Close the graph: input `x` (batch, n_in) -> output `y` (batch, n_out), dynamic batch axis."""
        self.nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
        graph = helper.make_graph(
            self.nodes,
            "fpewiden",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])],
            initializer=self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="fpewiden")


def _linear(g: GraphBuilder, x: str, w: torch.Tensor, b: torch.Tensor | None, base: str) -> str:
    y = g.node("MatMul", [x, g.weight(w.T.contiguous(), f"{base}_weight_t")])
    return g.node("Add", [y, g.weight(b, f"{base}_bias")]) if b is not None else y


def _blocks(g: GraphBuilder, x: str, blocks: Blocks, act: str, base: str) -> str:
    """x (B, d) -> Gather -> Split into α (B, d/α) -> per block MatMul + bias + act + MatMul -> Concat -> Gather.

    Separate per-block MatMuls with 1-D biases let ONNX Runtime fuse MatMul+Add(+activation) as it does for the
    dense original; one batched (α, B, d/α) MatMul with Transposes measured slower (bench/results/README.md).
    """
    a, dblk, _ = blocks.w_in.shape
    t = g.node("Gather", [x, g.const(blocks.in_perm.numpy().astype(np.int32), f"{base}_in_perm")], axis=1)
    pieces = [g.name(f"{base}_block_in") for _ in range(a)]
    sizes = g.const(np.full(a, dblk, np.int64), "split")
    g.nodes.append(helper.make_node("Split", [t, sizes], pieces, name=g.name("split"), axis=1))
    outs = []
    for c in range(a):
        u = g.node("MatMul", [pieces[c], g.weight(blocks.w_in[c], f"{base}_in_block{c}")])
        u = g.node("Add", [u, g.weight(blocks.b_in[c, 0], f"{base}_in_bias_block{c}")])
        u = g.activation(u, act)
        outs.append(g.node("MatMul", [u, g.weight(blocks.w_out[c], f"{base}_out_block{c}")]))
    t = g.node("Concat", outs, axis=1)
    return g.node("Gather", [t, g.const(blocks.out_perm.numpy().astype(np.int32), f"{base}_out_perm")], axis=1)


def mlp_to_onnx(
    layers: list[tuple[str, torch.Tensor, torch.Tensor | None]],
    activation: str,
    opset: int = 17,
    blocks: Blocks | None = None,
) -> onnx.ModelProto:
    """`layers`: (name, weight (out, in), bias) in forward order. `blocks` (the fast layout) replaces layers 0
    and 1 with their block form."""
    g = GraphBuilder(opset)
    x = "x"
    i = 0
    while i < len(layers):
        name, w, b = layers[i]
        if i == 0 and blocks is not None:
            x = _blocks(g, x, blocks, activation, name)
            _, _, b_out = layers[1]
            if b_out is not None:
                x = g.node("Add", [x, g.weight(b_out, f"{layers[1][0]}_bias")])
            i = 2
        else:
            x = _linear(g, x, w, b, name)
            i += 1
        if i < len(layers):
            x = g.activation(x, activation)
    return g.model(x, layers[0][1].shape[1], layers[-1][1].shape[0])


def _layers(tr: LoadedModel) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(name, weight with its zero pattern enforced, bias) per Linear, in forward order."""
    tensors = tr.tensors()
    out = []
    for name, has_b in zip(tr.model.names, tr.model.has_bias, strict=True):
        w = tensors[f"{name}.weight"]
        if f"{name}.weight" in tr.masks:
            w = torch.where(tr.masks[f"{name}.weight"], w, 0)
        out.append((name, w, tensors[f"{name}.bias"] if has_b else None))
    return out


def _fast_blocks(tr: LoadedModel) -> Blocks:
    alpha = tr.ck.meta.alpha
    if alpha is None:
        raise FpewidenError("the fast layout is for FPE conversions (this checkpoint has no fpewiden metadata)")
    pairs = find_pairs(tr.ck)
    if len(pairs) != 1:
        raise FpewidenError(f"the fast layout supports MLPs with one hidden layer (this one has {len(pairs)})")
    (p,) = pairs
    t = tr.tensors()
    m_in = tr.masks.get(p.in_weights[0], t[p.in_weights[0]] != 0)
    m_out = tr.masks.get(p.out_weight, t[p.out_weight] != 0)
    b_in = t.get(p.in_biases[0]) if p.in_biases[0] else None
    return find_blocks(t[p.in_weights[0]], m_in, b_in, t[p.out_weight], m_out, alpha)


def build_mlp(tr: LoadedModel, layout: str, opset: int, samples: int = 64) -> Built:
    """The MLP's graph (blocks for `fast`), and standard-normal inputs to verify it on."""
    blocks = _fast_blocks(tr) if layout == "fast" else None
    model = mlp_to_onnx(_layers(tr), tr.activation, opset, blocks)
    x = torch.randn(samples, tr.n_inputs, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tr.model(x).numpy()
    return Built(model, {"x": x.numpy()}, reference, "y", 1.0)
