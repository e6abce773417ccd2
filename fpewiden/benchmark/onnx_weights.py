"""The weights an ONNX file stores, as bench counts them: initializers (sparse ones densified), and whether the
file is quantized (integer weight matrices, as onnxruntime.quantization's quantize_dynamic and MatMulNBits
write). A quantized file's bytes are what it stores, counted exactly; a float file's are counted per storage
format like every other model's.
"""

from __future__ import annotations

import numpy as np


def initializer_arrays(proto) -> dict[str, np.ndarray]:
    """name -> array of every initializer, sparse initializers densified."""
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for sp in proto.graph.sparse_initializer:
        dense = np.zeros(int(np.prod(sp.dims)), dtype=np.float32)
        dense[numpy_helper.to_array(sp.indices).reshape(-1)] = numpy_helper.to_array(sp.values)
        arrays[sp.values.name] = dense.reshape(tuple(sp.dims))
    return arrays


def quantized(arrays: dict[str, np.ndarray]) -> bool:
    """Whether the file stores weight matrices as integers (int8, uint8, or 4-bit packed into bytes)."""
    return any(a.ndim >= 2 and a.dtype.kind in "iu" for a in arrays.values())


def stored_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes the initializers occupy as stored (a sparse initializer counted densely, as ONNX Runtime runs it)."""
    return sum(int(a.nbytes) for a in arrays.values())


def stored_nonzeros(arrays: dict[str, np.ndarray]) -> int:
    """Non-zero weights in the matrices, integer ones included (symmetric int8 keeps zero at 0)."""
    return sum(int(np.count_nonzero(a)) for a in arrays.values() if a.ndim >= 2)


def quantized_bytes(arrays: dict[str, np.ndarray]) -> dict[str, int | None]:
    """A quantized file's bytes in bench's per-format table: `stored`, exactly what it holds (what ONNX Runtime
    reads), and `dense_fp32`, the same weights as fp32 (the reference column); no other format applies."""
    from fpewiden.benchmark.formats import FORMATS

    fp32 = sum(a.size * 4 for a in arrays.values() if a.ndim >= 2 or a.dtype.kind == "f")
    return {f: None for f in FORMATS} | {"dense_fp32": int(fp32), "stored": stored_bytes(arrays)}
