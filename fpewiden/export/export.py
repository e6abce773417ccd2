"""`fpewiden export`: write a verified ONNX file in the chosen layout and report what it holds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from fpewiden.arch import find_pairs
from fpewiden.errors import FpewidenError
from fpewiden.export.mlp_graph import LAYOUTS, mlp_to_onnx
from fpewiden.export.save import save, staged
from fpewiden.export.structure import find_blocks
from fpewiden.export.verify import check, compare, ort_session
from fpewiden.io.outputs import check_outputs
from fpewiden.model.loaded import LoadedModel, load_model


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
        int(np.prod(s.dims)) * onnx.helper.tensor_dtype_to_np_dtype(s.values.data_type).itemsize
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


def _mlp_layers(tr: LoadedModel) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    tensors = tr.tensors()
    out = []
    for name, has_b in zip(tr.model.names, tr.model.has_bias, strict=True):
        w = tensors[f"{name}.weight"]
        if f"{name}.weight" in tr.masks:
            w = torch.where(tr.masks[f"{name}.weight"], w, 0)
        out.append((name, w, tensors[f"{name}.bias"] if has_b else None))
    return out


def _fast_blocks(tr: LoadedModel):
    meta = tr.ck.fpe_metadata()
    if "alpha" not in meta:
        raise FpewidenError("the fast layout is for FPE conversions (this checkpoint has no fpewiden metadata)")
    pairs = find_pairs(tr.ck)
    if len(pairs) != 1:
        raise FpewidenError(f"the fast layout supports MLPs with one hidden layer (this one has {len(pairs)})")
    (p,) = pairs
    alpha = int(meta["alpha"])
    t = tr.tensors()
    m_in = tr.masks.get(p.in_weights[0], t[p.in_weights[0]] != 0)
    m_out = tr.masks.get(p.out_weight, t[p.out_weight] != 0)
    return find_blocks(
        t[p.in_weights[0]], m_in, t.get(p.in_biases[0]) if p.in_biases[0] else None, t[p.out_weight], m_out, alpha
    )


def export(
    ckpt: Path,
    out: Path,
    layout: str = "dense",
    dtype: str = "fp32",
    opset: int | None = None,
    verify: bool = True,
    samples: int = 64,
    external: bool | None = None,
    force: bool = False,
) -> dict:
    """Export `ckpt` to `out`. `external`: weights in `out.data` (None: only past the 2 GiB protobuf limit).
    `opset` None: 17 for MLPs, 18 (the dynamo exporter's lowest) for Hugging Face models."""
    if layout == "block":
        layout = "fast"
    if layout not in LAYOUTS:
        raise FpewidenError(f"--layout {layout!r}: choose dense, sparse or fast (alias: block)")
    if dtype not in ("fp32", "fp16"):
        raise FpewidenError(f"--dtype {dtype!r}: choose fp32 or fp16")
    if opset is not None and not 13 <= opset <= 21:
        raise FpewidenError(f"--opset {opset}: fpewiden emits opsets 13 to 21")
    if out.suffix != ".onnx":
        raise FpewidenError(f"--out {out}: name the output *.onnx")
    if not ckpt.exists():
        raise FpewidenError(f"no such file or directory: {ckpt}")
    check_outputs([out, out.with_name(out.name + ".data")], [ckpt], force)
    hf = ckpt.is_dir()
    if hf and opset is not None and opset < 18:
        raise FpewidenError(
            f"--opset {opset}: Hugging Face models go through torch.onnx's dynamo exporter, which emits opset 18 "
            "or newer"
        )
    tr = load_model(ckpt, head=True)
    if tr.ck.kind == "hf":
        from fpewiden.export.hf import export_hf

        return export_hf(tr, out, layout, dtype, opset or 18, verify, external)
    opset = opset or 17
    blocks = _fast_blocks(tr) if layout == "fast" else None
    model = mlp_to_onnx(_mlp_layers(tr), tr.activation, layout, dtype, opset, blocks)
    result: dict = {"checkpoint": str(ckpt), "out": str(out), "layout": layout, "dtype": dtype}
    with staged(out) as tmp:
        result["external_data"] = save(model, tmp, external)
        result["checker"] = check(tmp)
        if verify:
            x = torch.randn(samples, tr.n_inputs, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                ref = tr.model(x).numpy()
            got = ort_session(tmp).run(None, {"x": x.numpy()})[0]
            result["verify"] = compare(got, ref, dtype)
        result.update(model_stats(onnx.load(str(tmp), load_external_data=False), tmp))
    if layout == "sparse":
        result["note"] = sparse_note(result)
    meta = tr.ck.fpe_metadata()
    result["fpewiden"] = {k: meta[k] for k in ("alpha", "split", "outgoing", "budget") if k in meta}
    return result


def dumps(result: dict) -> str:
    return json.dumps(result, indent=2, default=lambda o: float(o) if isinstance(o, np.floating) else str(o))
