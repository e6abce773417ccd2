"""`fpewiden bench` (not --sweep) from its options: every option and output checked, then the models from their
headers, and only then data loaded and models measured, so a bad input never costs minutes of work."""

from __future__ import annotations

from pathlib import Path

import torch

from fpewiden.benchmark.measure import ENGINES, bench, preflight
from fpewiden.benchmark.outputs import table, write
from fpewiden.console import console
from fpewiden.data.specs import data_file, load_data
from fpewiden.errors import FpewidenError
from fpewiden.io.outputs import check_outputs
from fpewiden.train.trainer import resolve_device


def bench_command(
    models: list[Path],
    data: str | None,
    batch_sizes: str,
    engines: str,
    device: str,
    repeat: int,
    warmup: int,
    threads: int,
    seed: int,
    json_out: Path | None,
    markdown: Path | None,
    plot: Path | None,
    force: bool,
) -> list[dict]:
    if data is None:
        raise FpewidenError("--data is required (a DATA spec such as dnf:clauses=16 or digits)")
    engine_list = [e.strip() for e in engines.split(",") if e.strip()]
    bad = [e for e in engine_list if e not in ENGINES]
    if bad or not engine_list:
        raise FpewidenError(f"--engines: unknown engine {bad[0] if bad else ''!r}; choose from torch, ort")
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise FpewidenError(f"--batch-sizes {batch_sizes!r}: expected comma-separated integers") from None
    if not sizes or min(sizes) < 1:
        raise FpewidenError(f"--batch-sizes {batch_sizes!r}: every batch size must be at least 1")
    if repeat < 1 or warmup < 0 or threads < 1:
        raise FpewidenError("--repeat and --threads must be at least 1, and --warmup not negative")
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FpewidenError("--plot needs matplotlib: pip install 'fpewiden[plot]'") from None
    outputs = [p for p in (json_out, markdown, plot) if p is not None]
    data_inputs = [p] if (p := data_file(data)) is not None else []
    check_outputs(outputs, [*models, *data_inputs], force, what="output path")
    preflight(list(models))
    dev = resolve_device(device)
    torch.set_num_threads(threads)
    dataset = load_data(data, seed)
    rows = bench(list(models), dataset, sizes, engine_list, dev, repeat, warmup, threads)
    console().print(table(rows))
    write(
        rows,
        json_out,
        markdown,
        plot,
        {
            "data": dataset.describe(),
            "batch_sizes": sizes,
            "engines": engine_list,
            "repeat": repeat,
            "warmup": warmup,
            "threads": threads,
        },
    )
    return rows
