"""`fpewiden export`: write a verified ONNX file in the chosen layout and report what it holds.

A builder turns the model into a graph (mlp_graph.py for MLP chains, hf.py for Hugging Face models); the steps
after it are the same for both: storage edits (sparse, fp16), staging, onnx.checker, ONNX Runtime against
PyTorch, and the numbers.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from fpewiden.errors import FpewidenError
from fpewiden.export.onnx_edit import Built, fp16_weights, model_stats, sparse_note, sparsify
from fpewiden.export.save import save
from fpewiden.export.verify import check, compare, ort_session
from fpewiden.io.atomic import staged
from fpewiden.io.checkpoint import open_checkpoint
from fpewiden.io.outputs import check_outputs
from fpewiden.io.provenance import Provenance, onnx_doc
from fpewiden.model.loaded import LoadedModel, load_model

LAYOUTS = ("dense", "sparse", "fast", "packed")


def build(tr: LoadedModel, layout: str, opset: int | None) -> Built:
    """The graph of a loaded model (MLP or Hugging Face) in `layout`, before storage edits."""
    if tr.ck.kind == "hf":
        from fpewiden.export.hf import build_hf

        return build_hf(tr, layout, opset or 18)
    from fpewiden.export.mlp_graph import build_mlp

    return build_mlp(tr, layout, opset or 17)


def write(
    built: Built, out: Path, layout: str, dtype: str, verify: bool, external: bool | None, provenance: Provenance
) -> dict:
    """Storage edits, then the file(s) staged, checked and verified before they are renamed into place."""
    model = built.model
    if layout == "sparse":
        sparsify(model, built.sparse_max_density)
    if dtype == "fp16":
        fp16_weights(model)
    model.producer_name = "fpewiden"
    model.doc_string = onnx_doc(provenance)
    result: dict = {"output": built.output}
    data = out.with_name(out.name + ".data")
    with staged([data, out]) as stage:
        tmp = stage / out.name
        result["external_data"] = save(model, tmp, external)
        result["checker"] = check(tmp)
        if verify:
            got = ort_session(tmp, packed=layout == "packed").run(None, built.feeds)[0]
            result["verify"] = compare(got, built.reference, dtype)
        result.update(model_stats(onnx.load(str(tmp), load_external_data=False), tmp))
    if layout == "sparse":
        result["note"] = sparse_note(result)
    return result


def export_packed(
    ckpt: Path, out: Path, dtype: str, opset: int | None, verify: bool, external: bool | None, force: bool
) -> dict:
    """`--layout packed`: the packed checkpoint's matrices as PackedMatMul nodes (packed.py)."""
    from fpewiden.export.packed import packed_graph
    from fpewiden.io.provenance import digest
    from fpewiden.io.safetensors_stream import read_header
    from fpewiden.packed import kernels
    from fpewiden.packed.loader import module_of
    from fpewiden.packed.ort import ort_reason
    from fpewiden.packed.reader import is_packed, read_packed

    if dtype != "fp32":
        raise FpewidenError("--dtype applies to dense layouts; a packed file keeps its values' dtype (pack --dtype)")
    if opset is not None and opset < 18:
        raise FpewidenError(f"--opset {opset}: the packed layout goes through torch.onnx's dynamo exporter (opset 18+)")
    if ckpt.is_file() and ckpt.suffix == ".safetensors":
        read_header(ckpt)  # a truncated or corrupt file is named as such, not as one that is not packed
    if not is_packed(ckpt):
        raise FpewidenError(f"--layout packed exports a packed checkpoint; pack it first: fpewiden pack {ckpt} --out …")
    reason = ort_reason()
    if verify and reason is not None:
        raise FpewidenError(f"cannot verify a packed export: the ONNX Runtime packed op is {reason}")
    if kernels.path() == "torch":  # the export traces fpewiden's op, which only the compiled library defines
        why = kernels.native_reason() or f"{kernels.ENV}=torch forces the pure-torch fallback"
        raise FpewidenError(f"--layout packed needs fpewiden's compiled kernels ({why})")
    provenance = Provenance("export", lambda: digest([ckpt]))
    check_outputs([out, out.with_name(out.name + ".data")], [ckpt], force, provenance=provenance)
    pc = read_packed(ckpt)
    vocab = int((pc.config or {}).get("vocab_size", 1000))
    built = packed_graph(module_of(pc, tune=False), pc.kind, vocab, opset or 18, str(ckpt))
    result = {"checkpoint": str(ckpt), "out": str(out), "layout": "packed", "dtype": "as packed"}
    result.update(write(built, out, "packed", "fp32", verify, external, provenance))
    meta = pc.meta
    result["fpewiden"] = {k: getattr(meta, k) for k in ("alpha", "split", "outgoing", "budget") if getattr(meta, k)}
    return result


def export(
    ckpt: Path,
    out: Path,
    layout: str = "dense",
    dtype: str = "fp32",
    opset: int | None = None,
    verify: bool = True,
    external: bool | None = None,
    force: bool = False,
    model: LoadedModel | None = None,
) -> dict:
    """Export `ckpt` (or the already loaded `model` of it) to `out`. `external`: weights in `out.data` (None:
    only past the 2 GiB protobuf limit). `opset` None: 17 for MLPs, 18 (the dynamo exporter's lowest) for
    Hugging Face models."""
    if layout == "block":
        layout = "fast"
    if layout not in LAYOUTS:
        raise FpewidenError(f"--layout {layout!r}: choose dense, sparse, fast (alias: block) or packed")
    if dtype not in ("fp32", "fp16"):
        raise FpewidenError(f"--dtype {dtype!r}: choose fp32 or fp16")
    if opset is not None and not 13 <= opset <= 21:
        raise FpewidenError(f"--opset {opset}: fpewiden emits opsets 13 to 21")
    if out.suffix != ".onnx":
        raise FpewidenError(f"--out {out}: name the output *.onnx")
    if not ckpt.exists():
        raise FpewidenError(f"no such file or directory: {ckpt}")
    if layout == "packed":
        return export_packed(ckpt, out, dtype, opset, verify, external, force)
    provenance = Provenance("export", lambda: open_checkpoint(ckpt).sha256())
    check_outputs([out, out.with_name(out.name + ".data")], [ckpt], force, provenance=provenance)
    if ckpt.is_dir() and opset is not None and opset < 18:
        raise FpewidenError(
            f"--opset {opset}: Hugging Face models go through torch.onnx's dynamo exporter, which emits opset 18 "
            "or newer"
        )
    if layout == "fast" and model is None:  # decided from the header, before minutes of loading and tracing
        from fpewiden.export.fast import fast_layout_refusal

        refusal = fast_layout_refusal(open_checkpoint(ckpt).meta)
        if refusal is not None:
            raise FpewidenError(refusal)
    tr = model if model is not None else load_model(ckpt, head=True)
    result = {"checkpoint": str(ckpt), "out": str(out), "layout": layout, "dtype": dtype}
    result.update(write(build(tr, layout, opset), out, layout, dtype, verify, external, provenance))
    meta = tr.ck.meta
    result["fpewiden"] = {k: getattr(meta, k) for k in ("alpha", "split", "outgoing", "budget") if getattr(meta, k)}
    return result
