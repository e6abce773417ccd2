"""Check an exported model: onnx.checker, then ONNX Runtime against the PyTorch model on sample inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from fpewiden.errors import FpewidenError

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # max |error| / max |reference|; fp16 rounds weights to 11 bits


def ort_session(path: Path, threads: int | None = None, packed: bool = False):
    """A CPU session; `packed`: with fpewiden's PackedMatMul op registered (fpewiden/packed/ort.py)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FpewidenError("verification needs onnxruntime (pip install onnxruntime)") from None
    if packed:
        from fpewiden.packed.ort import session_options

        opts = session_options(threads)
    else:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _inline_sparse(model: onnx.ModelProto, base: Path) -> bool:
    """Read externally stored sparse values/indices back into the protobuf; True if there were any."""
    found = False
    for sp in model.graph.sparse_initializer:
        for t in (sp.values, sp.indices):
            if t.data_location == onnx.TensorProto.EXTERNAL:
                info = {e.key: e.value for e in t.external_data}
                with open(base / info["location"], "rb") as f:
                    f.seek(int(info.get("offset", 0)))
                    t.raw_data = f.read(int(info["length"]))
                del t.external_data[:]
                t.data_location = onnx.TensorProto.DEFAULT
                found = True
    return found


def check(path: Path) -> str:
    """onnx.checker on the written files. Its path-based check cannot read sparse initializers stored as external
    data (ONNX Runtime can), so such models are checked in memory with all data inlined, when under 2 GiB."""
    try:
        onnx.checker.check_model(str(path))
        return "passed"
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).splitlines()[0]
        model = onnx.load(str(path))
        if not _inline_sparse(model, path.parent):
            raise FpewidenError(f"onnx.checker rejects {path}: {first}") from None
    if model.ByteSize() >= 2**31:
        return "skipped: over 2 GiB with external sparse initializers, which onnx.checker cannot read"
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise FpewidenError(f"onnx.checker rejects {path}: {str(e).splitlines()[0]}") from None
    return "passed (in memory, sparse data inlined)"


def compare(outputs: np.ndarray, reference: np.ndarray, dtype: str) -> dict[str, float]:
    """Max absolute error and max error relative to the reference's scale; raises above the tolerance."""
    err = float(np.max(np.abs(outputs.astype(np.float64) - reference.astype(np.float64))))
    scale = float(np.max(np.abs(reference))) or 1.0
    rel = err / scale
    result = {"max_abs_error": err, "max_rel_error": rel, "tolerance": TOLERANCE[dtype]}
    if not rel <= TOLERANCE[dtype]:
        raise FpewidenError(
            f"verification failed: ONNX Runtime differs from PyTorch by {err:.3g} (relative {rel:.3g} > "
            f"{TOLERANCE[dtype]:g} for {dtype}); nothing was written"
        )
    return result
