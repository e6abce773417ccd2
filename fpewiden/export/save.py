"""Write an ONNX model, with its weights in an external data file when the protobuf would pass 2 GiB.

Dense initializers go out through onnx's external-data helpers. Those helpers leave sparse initializers inside
the protobuf, so their values and indices are written to the same data file here, with the same
location/offset/length fields ONNX uses for any external tensor. The caller stages both files (io.atomic).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from onnx import external_data_helper

PROTOBUF_LIMIT = 2**31 - 2**26  # leave headroom under protobuf's 2 GiB


def _externalize_sparse(model: onnx.ModelProto, data_path: Path, location: str) -> None:
    with open(data_path, "ab") as f:
        for sp in model.graph.sparse_initializer:
            for t in (sp.values, sp.indices):
                if not t.HasField("raw_data"):
                    t.raw_data = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t)).raw_data
                f.seek(0, os.SEEK_END)
                offset = f.tell()
                f.write(t.raw_data)
                external_data_helper.set_external_data(t, location, offset, len(t.raw_data))
                t.data_location = onnx.TensorProto.EXTERNAL
                t.ClearField("raw_data")


def save(model: onnx.ModelProto, path: Path, external: bool | None = None) -> bool:
    """Save `model` at `path`; returns whether weights went to `path.name + '.data'` beside it."""
    if external is None:
        external = model.ByteSize() > PROTOBUF_LIMIT
    if not external:
        onnx.save(model, str(path))
        return False
    location = f"{path.name}.data"
    data_path = path.parent / location
    data_path.unlink(missing_ok=True)
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location=location, size_threshold=1024
    )
    onnx.save(model, str(path))  # writes the dense initializers' data file
    _externalize_sparse(model, data_path, location)
    onnx.save(model, str(path), save_as_external_data=False)  # rewrite the protobuf with sparse fields pointing out
    return True
