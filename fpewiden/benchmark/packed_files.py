"""A packed checkpoint (what `fpewiden pack` wrote, fp32, bf16, int8 or int4 values) as a model bench measures: the
file a user ships, run by fpewiden's kernels (engine `packed`) and counted at the bytes it stores.

Bytes moved per inference: every packed matrix's arrays as stored (values, bits, row offsets, scales), every other
tensor at fp32 as the loader holds it, the embedding tables of a language model left out (a lookup reads a few
rows), as for every other model bench counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fpewiden.errors import FpewidenError
from fpewiden.io.safetensors_stream import DTYPES


def _nbytes(header, name: str) -> int:
    entry = header.entries[name]
    return int(np.prod(entry.shape, dtype=np.int64)) * DTYPES[entry.dtype].itemsize


def _numel(header, name: str) -> int:
    return int(np.prod(header.entries[name].shape, dtype=np.int64))


def packed_model(path: Path, engines: list[str]):
    """(the measured model's info, the torch module running the packed kernels) of a packed checkpoint."""
    from fpewiden.benchmark.competitors import stored_bytes_table
    from fpewiden.packed import kernels
    from fpewiden.packed.loader import module_of
    from fpewiden.packed.reader import read_packed

    if "packed" not in engines:
        raise FpewidenError(f"{path} is a packed checkpoint: measure it with --engines packed (fpewiden's kernels)")
    pc = read_packed(path)
    moved = (lambda _n: True) if pc.kind == "mlp" else _not_embedding
    stored = fp32 = params = nnz = 0
    for name in pc.names():
        if name in pc.entries:
            e = pc.entries[name]
            params += e.rows * e.cols
            if moved(name):
                stored += sum(_nbytes(pc.headers[t], t) for t in e.arrays(name).values())
                fp32 += e.rows * e.cols * 4
                # the dense layout stores zeros as values: count its non-zeros
                nnz += int(torch.count_nonzero(pc.stored(e.arrays(name)["values"]))) if e.format == "dense" else e.nnz
            continue
        header = pc.headers[name].entries[name]
        n = _numel(pc.headers[name], name)
        params += n
        if moved(name) and header.dtype in ("F32", "F16", "BF16", "F64"):
            stored += n * 4
            fp32 += n * 4
            nnz += int(torch.count_nonzero(pc.stored(name))) if len(header.shape) == 2 else 0
    module = module_of(pc).eval()
    info = {
        "kind": "packed",
        "neurons": None,
        "nnz": nnz,
        "params": params,
        "bytes": stored_bytes_table(stored, fp32),
        "packed_kernel": kernels.path(),
        "values": sorted({e.dtype for e in pc.entries.values()}),
    }
    if pc.kind == "hf":
        info["bytes_by_group"] = {"as stored": stored}
    if (read := stored + spread_bytes(module)) != stored:
        info["read_bytes"] = read
    return info, module, pc.kind


def spread_bytes(module: torch.nn.Module) -> int:
    """The bytes the kernels here read beyond the stored ones: layers that run their values spread to the dense
    layout (int8 and int4 bitmask matrices on the avx2 kernels, which lack an expand instruction) read that
    layout's bytes, not the stored bitmask's."""
    from fpewiden.packed.ops import PackedLinear

    layers = [m for m in module.modules() if isinstance(m, PackedLinear) and m.running.format != m.format]
    return sum(m.running.nbytes - m.nbytes for m in layers)


def _not_embedding(name: str) -> bool:
    from fpewiden.benchmark.formats import group_of

    return group_of(name, set()) != "embeddings"
