"""ONNX graphs for MLP checkpoints, built node by node so every layout's operators and bytes are explicit.

dense: MatMul(x, Wᵀ) + b per layer, weights as plain fp32 initializers: the honest baseline.
fast:  the block structures of fast.py, exported through torch.onnx (one implementation for MLPs and HF).
Sparse storage and fp16 storage are edits of the finished graph (onnx_edit.py), shared with Hugging Face models.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fpewiden.errors import FpewidenError
from fpewiden.export.onnx_edit import Built
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


def mlp_to_onnx(
    layers: list[tuple[str, torch.Tensor, torch.Tensor | None]], activation: str, opset: int = 17
) -> onnx.ModelProto:
    """`layers`: (name, weight (out, in), bias) in forward order."""
    g = GraphBuilder(opset)
    x = "x"
    i = 0
    while i < len(layers):
        name, w, b = layers[i]
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


def build_mlp(tr: LoadedModel, layout: str, opset: int, samples: int = 64) -> Built:
    """The MLP's graph (node by node; the fast layout's blocks through torch.onnx, see fast.py), and
    standard-normal inputs to verify it on."""
    x = torch.randn(samples, tr.n_inputs, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = tr.model(x).numpy()
    if layout == "fast":
        return Built(_fast_graph(tr, max(opset, 18)), {"x": x.numpy()}, reference, "y", 1.0)
    return Built(mlp_to_onnx(_layers(tr), tr.activation, opset), {"x": x.numpy()}, reference, "y", 1.0)


def _fast_graph(tr: LoadedModel, opset: int) -> onnx.ModelProto:
    from fpewiden.arch.chain import linear_layers
    from fpewiden.export.fast import FastMLP, structures
    from fpewiden.export.torch_onnx import to_onnx

    by_pair = structures(tr)
    index = {m: i for i, (m, _, _) in enumerate(linear_layers(tr.ck))}
    layers = [(w, b) for _, w, b in _layers(tr)]
    fast = FastMLP(layers, {index[name]: st for name, st in by_pair.items()}, tr.model.act).eval()
    example = torch.zeros(2, tr.n_inputs)
    return to_onnx(fast, (example,), ["x"], ["y"], ({0: "batch"},), opset, str(tr.ck.path))
