"""Check an exported model: onnx.checker, then ONNX Runtime against the PyTorch model on sample inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from fpewiden.errors import FpewidenError

TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}  # max |error| / max |reference|; fp16 rounds weights to 11 bits


def ort_session(path: Path, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise FpewidenError("verification needs onnxruntime (pip install onnxruntime)") from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise FpewidenError(f"onnx.checker rejects {path}: {str(e).splitlines()[0]}") from None


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
