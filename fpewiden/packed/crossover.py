"""Which mode a packed layer runs for n inputs, measured per shape on this machine, never guessed.

For each distinct (kernel, threads, format, dtype, shape, density) the layer's modes (ops.py: `gemv`, `spmm`,
`dense` = unpack and GEMM; `int8_mm` for dense int8 layers) are timed at BATCHES inputs, round-robin, medians
of a few calls; a layer then runs, for n inputs, the mode that was fastest at the smallest measured batch ≥ n.
Results are cached in `~/.cache/fpewiden/crossover.json` (or `$FPEWIDEN_CACHE`), so a shape is measured once per
machine, at load time, never while a model is being timed.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from fpewiden.packed.ops import PackedLinear

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CALLS = 3  # timed calls per mode and batch (after one untimed)


def cache_file() -> Path:
    root = os.environ.get("FPEWIDEN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fpewiden")
    return Path(root) / "crossover.json"


def key(layer: PackedLinear) -> str:
    """What the measurement depends on (the layout `gemv` runs too: a spread layer decodes another matrix); the
    kernels' source hash too, so rebuilt kernels are measured anew."""
    from fpewiden.packed.built import source_hash

    density = round(layer.nnz / max(1, layer.out_features * layer.in_features), 1)
    return (
        f"{layer.kernel}|{source_hash()}|threads={torch.get_num_threads()}|{layer.format}|{layer.values.dtype}|"
        f"{layer.out_features}x{layer.in_features}|density={density}|{','.join(layer.modes())}|"
        f"gemv={layer.running.format}"
    )


def _read() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(table: dict) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home: the measurement is simply redone next time


def measure(layer: PackedLinear, batches: tuple[int, ...] = BATCHES) -> list[tuple[int, str]]:
    """(batch, fastest mode) at each of `batches`."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n in batches:
        x = torch.randn(n, layer.in_features, generator=g)
        modes = layer.modes()
        times: dict[str, list[float]] = {m: [] for m in modes}
        for m in modes:
            layer(x, mode=m)
        for _ in range(CALLS):
            for m in modes:
                t = time.perf_counter()
                layer(x, mode=m)
                times[m].append(time.perf_counter() - t)
        out.append((n, min(modes, key=lambda m: statistics.median(times[m]))))
    return out


def tune(layers: list[PackedLinear]) -> None:
    """Give every layer its measured modes (measuring the shapes this machine has not seen)."""
    table = _read()
    fresh = False
    for layer in layers:
        if layer.kernel == "torch":
            continue
        k = key(layer)
        if k not in table:
            table[k] = measure(layer)
            fresh = True
        layer.table = [(int(n), str(m)) for n, m in table[k]]
    if fresh:
        _write(table)
