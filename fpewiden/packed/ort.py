"""Packed models in ONNX Runtime: the custom-op library that runs `ai.fpewiden::PackedMatMul` (csrc/ort/, built at
set-up by build.py) and the session options that load it. In a user's own ONNX Runtime session:

    opts = onnxruntime.SessionOptions()
    opts.register_custom_ops_library(str(fpewiden.packed.ort_library()))
    session = onnxruntime.InferenceSession("model.onnx", opts, providers=["CPUExecutionProvider"])

The op runs the same CPU kernels as the torch runtime, on ONNX Runtime's intra-op threads, reading the packed
initializers where ONNX Runtime holds them. `FPEWIDEN_KERNEL` forces an ISA as it does for torch (read when a
session is created).
"""

from __future__ import annotations

import functools
from pathlib import Path

from fpewiden.errors import FpewidenError

DOMAIN = "ai.fpewiden"
OP = "PackedMatMul"


@functools.cache
def ort_reason() -> str | None:
    """Why the ONNX Runtime library cannot run here (None: it can); checked once per process, as the kernels are
    (it hashes the sources)."""
    from fpewiden.packed.built import ort_library, ort_source_hash, ort_stamp

    if not ort_library().is_file():
        return "not built (no ONNX Runtime headers or compiler at set-up? run: python -m fpewiden.packed.build)"
    built = ort_stamp() or {}
    if built.get("sources") != ort_source_hash():
        return "built from other sources (run: python -m fpewiden.packed.build)"
    try:
        import onnxruntime as ort
    except ImportError:
        return "unusable: onnxruntime is not installed"
    minor = int(ort.__version__.split(".")[1]) if ort.__version__.startswith("1.") else 99
    if minor < int(built.get("api", 0)):
        return f"built for ONNX Runtime >= 1.{built.get('api')}; this is {ort.__version__} (pip install -U onnxruntime)"
    return None


def ort_library() -> Path:
    """The custom-op library to register in an ONNX Runtime session; raises FpewidenError saying why there is
    none."""
    from fpewiden.packed.built import ort_library as path

    reason = ort_reason()
    if reason is not None:
        raise FpewidenError(f"the ONNX Runtime packed op is {reason}")
    return path()


def session_options(threads: int | None = None):
    """onnxruntime.SessionOptions with the packed op registered (`threads`: intra-op threads, None: ORT's
    default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(ort_library()))
    if threads:
        opts.intra_op_num_threads = threads
    return opts


def uses_packed_op(model) -> bool:
    """Whether an onnx.ModelProto has PackedMatMul nodes (so a session needs the library)."""
    nodes = [*model.graph.node, *(n for f in model.functions for n in f.node)]
    return any(n.domain == DOMAIN and n.op_type == OP for n in nodes)
