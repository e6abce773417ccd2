"""Edits of a finished ONNX graph that every exported model shares, MLP or Hugging Face: weights as sparse
initializers, weights stored as fp16, and what a model holds (bytes, nodes, operators)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass
class Built:
    """What a graph builder hands to export's shared closing steps: the graph, inputs to verify it on, PyTorch's
    output on those inputs, the output's name, and the density under which `--layout sparse` stores a weight
    matrix sparse (1.0 for MLPs: every weight matrix; 0.5 for Hugging Face models)."""

    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    reference: np.ndarray
    output: str
    sparse_max_density: float


def sparsify(model: onnx.ModelProto, max_density: float) -> int:
    """Move 2-D float initializers of density ≤ `max_density` to sparse_initializer (COO, int64 linear
    indices, -0.0 normalised to +0.0 so no signed zero is stored); returns how many moved."""
    g = model.graph
    keep, n = [], 0
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 2 and arr.dtype.kind == "f" and np.count_nonzero(arr) <= max_density * arr.size:
            flat = (arr + 0).reshape(-1)
            idx = np.flatnonzero(flat).astype(np.int64)
            values = numpy_helper.from_array(flat[idx], init.name)
            indices = numpy_helper.from_array(idx, f"{init.name}_indices")
            g.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(arr.shape)))
            n += 1
        else:
            keep.append(init)
    del g.initializer[:]
    g.initializer.extend(keep)
    return n


def fp16_weights(model: onnx.ModelProto) -> int:
    """Store fp32 initializers of 2+ dims as fp16, each cast back to fp32 where it is used: half the weight
    bytes, fp32 arithmetic (ONNX Runtime's CPU provider has few fp16 kernels). Returns how many were cast."""
    g = model.graph
    casts = []
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.ndim >= 2:
            name = init.name
            init.CopyFrom(numpy_helper.from_array(arr.astype(np.float16), f"{name}__fp16"))
            casts.append(
                helper.make_node("Cast", [f"{name}__fp16"], [name], to=onnx.TensorProto.FLOAT, name=f"{name}__cast")
            )
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    return len(casts)


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Stored bytes of a tensor, whether its data is inside the protobuf or in an external file."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return int(next(e.value for e in t.external_data if e.key == "length"))
    return numpy_helper.to_array(t).nbytes


def model_stats(model: onnx.ModelProto, path: Path) -> dict:
    """Bytes as stored: dense initializers, plus values and indices of sparse ones; files include OUT.data."""
    g = model.graph
    dense = sum(tensor_bytes(t) for t in g.initializer)
    sparse = sum(tensor_bytes(s.values) + tensor_bytes(s.indices) for s in g.sparse_initializer)
    sparse_dense = sum(
        int(np.prod(s.dims)) * helper.tensor_dtype_to_np_dtype(s.values.data_type).itemsize
        for s in g.sparse_initializer
    )
    data = path.parent / f"{path.name}.data"
    ops = Counter(n.op_type for n in g.node)
    return {
        "file_bytes": path.stat().st_size + (data.stat().st_size if data.exists() else 0),
        "weight_bytes": dense + sparse,
        "dense_initializer_bytes": dense,
        "sparse_initializer_bytes": sparse,
        "sparse_as_dense_bytes": sparse_dense,
        "sparse_initializers": len(g.sparse_initializer),
        "nodes": len(g.node),
        "ops": dict(sorted(ops.items())),
        "opset": next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
    }


def sparse_note(stats: dict) -> str:
    """What sparse storage bought, in numbers: ONNX Runtime densifies sparse initializers at load."""
    stored, dense = stats["sparse_initializer_bytes"], stats["sparse_as_dense_bytes"]
    if not dense:
        return "no weight matrix was sparse enough to store as a sparse initializer"
    ratio = stored / dense
    size = "smaller" if ratio < 1 else "larger"
    return (
        f"stored sparse, the sparse matrices take {ratio:.2f}× their dense bytes ({size}); ONNX Runtime densifies "
        "them when it loads the model, so inference is not faster"
    )
