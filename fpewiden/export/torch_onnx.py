"""torch.onnx's torch.export-based exporter (dynamo=True, needs onnxscript), quietly, into memory.

Used for Hugging Face models and for the fast layout's block modules. The TorchScript exporter (dynamo=False)
traced transformers 5's attention masking wrongly: on MiniLM its ONNX output differed from PyTorch by more than 1
(checked here), so it is not used.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from fpewiden.errors import FpewidenError


def to_onnx(
    module: nn.Module,
    args: tuple,
    input_names: list[str],
    output_names: list[str],
    dynamic: tuple[dict[int, str], ...],
    opset: int,
    what: str,
    translations: dict | None = None,
) -> onnx.ModelProto:
    """`dynamic`: per input, its dynamic axes by name (e.g. {0: "batch", 1: "sequence"}); `translations`: torch
    op -> onnxscript function, for custom ops (torch.onnx's custom_translation_table)."""
    dims: dict[str, torch.export.Dim] = {}
    shapes = tuple({axis: dims.setdefault(n, torch.export.Dim(n)) for axis, n in d.items()} for d in dynamic)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        # the exporter prints its progress on stdout; keep stdout for fpewiden's own report. Its optional-package
        # notes ("torchvision is not installed") are logged by loggers torch configures itself at import
        for name in ("torch.onnx", "torch.onnx._internal.exporter._registration"):
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_shapes=shapes,
                    opset_version=opset,
                    dynamo=True,
                    external_data=True,
                    custom_translation_table=translations,
                    verbose=False,
                )
            except Exception as e:  # the exporter's failures are many and varied; name it in one line
                first = str(e).splitlines()[0] if str(e) else ""
                raise FpewidenError(f"torch.onnx cannot export {what}: {type(e).__name__}: {first}") from None
        return onnx.load(str(path))  # with the exporter's external data, if any, into memory
