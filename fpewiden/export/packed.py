"""`export --layout packed`: a packed checkpoint (`fpewiden pack`) as ONNX whose packed matrices stay packed.

Each packed Linear becomes one `ai.fpewiden::PackedMatMul` node (fpewiden/packed/ort.py; the op the ONNX Runtime
library in csrc/ort/ runs) fed by the packed arrays as initializers, with the format and shape as attributes:

    Y = PackedMatMul(X, values, bits, row_ptr?, bias?, scales?)  format, rows, cols, stride, alpha, planes, group

Everything else is standard ONNX from torch.onnx's dynamo exporter (torch_onnx.py), which maps the torch op
`fpewiden::packed_linear` to that node through a custom translation table. MLP chains and Hugging Face models
(BERT-style encoders, gated FFNs, causal LMs) alike; verified in ONNX Runtime with the op against the torch
runtime of the same packed checkpoint, on inputs of another shape than the export's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fpewiden.export.hf import ModelOutput, output_name
from fpewiden.export.onnx_edit import Built
from fpewiden.export.torch_onnx import to_onnx
from fpewiden.packed.format import FORMATS
from fpewiden.packed.ort import DOMAIN, OP


def register_schema() -> None:
    """The op's ONNX schema, in this process (the exporter and onnx.checker look ops up by schema)."""
    from onnx import defs

    if defs.has(OP, DOMAIN):
        return
    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    optional = defs.OpSchema.FormalParameterOption.Optional
    ints = {name: A(name, defs.OpSchema.AttrType.INT, doc) for name, doc in (
        ("rows", "output features"), ("cols", "input features"), ("stride", "bytes per row of bits"),
        ("alpha", "parent format: children per parent (1 for bitmask)"),
        ("planes", "parent format: bit planes of the child id (0 for bitmask)"),
    )}  # fmt: skip
    group = A("group", defs.OpSchema.AttrType.INT, "int4 values: columns per scale", required=False)
    defs.register_schema(
        defs.OpSchema(
            OP,
            DOMAIN,
            1,
            doc="Y = X Wᵀ + bias for a packed W (fpewiden/packed/format.py; docs/packed.md documents the layout)",
            inputs=[
                P("X", "T", "(…, cols)"),
                P("values", "V", "the stored values, PAD zeros at the end"),
                P("bits", "tensor(uint8)", "bitmask rows or child-id planes"),
                P("row_ptr", "tensor(int64)", "bitmask: rows + 1 offsets into values", param_option=optional),
                P("bias", "T", "(rows)", param_option=optional),
                P("scales", "T", "int8 and int4 values: their scales", param_option=optional),
            ],
            outputs=[P("Y", "T", "(…, rows)")],
            type_constraints=[
                ("T", ["tensor(float)"], "activations"),
                (
                    "V",
                    ["tensor(float)", "tensor(bfloat16)", "tensor(float16)", "tensor(int8)", "tensor(uint8)"],
                    "stored values (uint8: int4, two per byte)",
                ),
            ],
            attributes=[A("format", defs.OpSchema.AttrType.STRING, "bitmask | parent | dense"), *ints.values(), group],
        )
    )


def _translation() -> dict:
    """torch's packed op -> the ONNX node (the torch op's isa and mode are run-time choices, not part of the
    file: ONNX Runtime's op picks its kernel from the CPU and its mode from the batch)."""
    from onnxscript.values import Opset

    register_schema()
    fpw = Opset(DOMAIN, 1)

    def packed_linear(x, values, bits, row_ptr, bias, rows, cols, fmt, dtype, alpha, planes, stride, isa, mode,
                      scales=None, group=0):  # fmt: skip
        quantized = {"group": group} if group else {}
        return getattr(fpw, OP)(
            x, values, bits, row_ptr, bias, scales,
            format=FORMATS[fmt], rows=rows, cols=cols, stride=stride, alpha=alpha, planes=planes, **quantized,
        )  # fmt: skip

    return {torch.ops.fpewiden.packed_linear.default: packed_linear}


def write_packed_onnx(model: nn.Module, kind: str, vocab: int, out: Path) -> Path:
    """An unverified packed export of an in-memory packed module (bench's `ort-packed` engine)."""
    from fpewiden.export.save import save

    save(packed_graph(model, kind, vocab, 18, str(out)).model, out)
    return out


def packed_graph(model: nn.Module, kind: str, vocab: int, opset: int, what: str) -> Built:
    """The graph of a packed torch module (an MLP chain, or a transformers model with PackedLinear layers), with
    verification inputs of another batch (and sequence length) than the export's."""
    from fpewiden.packed.ops import PackedLinear

    for m in model.modules():  # the ONNX Runtime op runs quantized values with int8 inputs at every batch where
        if isinstance(m, PackedLinear) and m.activations == "int8":  # VNNI runs: the reference the same way
            m.table = [(1 << 62, "gemv")]
    table = _translation()
    g = torch.Generator().manual_seed(0)
    if kind == "mlp":
        cols = model.layers[0].in_features
        x = torch.randn(4, cols, generator=g)
        proto = to_onnx(model, (x,), ["x"], ["y"], ({0: "batch"},), opset, what, table)
        x2 = torch.randn(3, cols, generator=g)
        with torch.no_grad():
            reference = model(x2).numpy()
        return Built(proto, {"x": x2.numpy()}, reference, "y", 1.0)
    wrapper = ModelOutput(model)
    out = output_name(model)
    ids = torch.randint(vocab, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    dyn = {0: "batch", 1: "sequence"}
    proto = to_onnx(wrapper, (ids, mask), ["input_ids", "attention_mask"], [out], (dyn, dyn), opset, what, table)
    ids2 = torch.randint(vocab, (3, 9), generator=g)
    mask2 = torch.ones_like(ids2)
    mask2[2, 5:] = 0
    with torch.no_grad():
        reference = wrapper(ids2, mask2).numpy()
    return Built(proto, {"input_ids": ids2.numpy(), "attention_mask": mask2.numpy()}, reference, out, 1.0)
