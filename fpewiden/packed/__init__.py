"""Packed sparse weights that run at their non-zero bytes: the format (format.py), the CPU kernels (csrc/, built by
build.py, chosen by kernels.py), the torch op and module (ops.py), packed checkpoints on disk (schema.py, written by
pack.py, read by reader.py), the loader that turns one into a torch module (loader.py) and the ONNX Runtime op
(ort.py, csrc/ort/).

Import order: packed/ sits below convert, export and benchmark, which call it; it never calls them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn


def load(path: Path | str, kernel: str | None = None, tune: bool = True, activations: str | None = None) -> nn.Module:
    """A packed MLP file as its chain (`module(x)`, x of shape [batch, in]), or a packed Hugging Face folder as the
    transformers model (e.g. LlamaForCausalLM, with `.generate`) whose packed Linear layers run the kernels.
    `kernel` forces a path (see fpewiden/packed/kernels.py); `tune` measures, once per shape and machine, where
    each kernel mode wins (fpewiden/packed/crossover.py); `activations` for int8 and int4 files: "int8" (the default
    where the CPU has VNNI: inputs quantized per row, the fast path) or "fp32" (inputs kept, closer to the
    unquantized model, slower)."""
    from pathlib import Path

    from fpewiden.packed.loader import load_packed

    return load_packed(Path(path), kernel, tune, activations)


def ort_library() -> Path:
    """The ONNX Runtime custom-op library that runs packed ONNX exports (`export --layout packed`): register it with
    `SessionOptions.register_custom_ops_library(str(ort_library()))`. Raises FpewidenError saying why there is none."""
    from fpewiden.packed.ort import ort_library as find

    return find()
