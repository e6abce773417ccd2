"""Where bench's results go: JSON (every measurement), Markdown (benchmark/report.py) and the plot
(benchmark/plot.py), each written whole or not at all, with the run's provenance."""

from __future__ import annotations

import json
from pathlib import Path

from fpewiden.benchmark.machine import describe
from fpewiden.benchmark.plot import plot
from fpewiden.benchmark.report import main_metric, markdown
from fpewiden.io.atomic import atomic_file
from fpewiden.io.provenance import Provenance, json_document, markdown_marker


def plot_title(rows: list[dict], data: str = "") -> str:
    """What was measured, on what, where: `digits: accuracy against weight bytes; latency × reference on AMD
    EPYC, 1 thread`. The data is named by its spec (a path by its file name: a sweep's temporary folder says
    nothing), not by its description."""
    spec = data.split(": ", 1)[0]
    name = Path(spec).name if "/" in spec else spec
    what = f"{name}: " if name else ""
    threads = [r["threads"] for r in rows if "threads" in r]
    return f"{what}{main_metric(rows)} against weight bytes; latency × reference on {describe(threads or None)}"


def write(
    rows: list[dict],
    json_path: Path | None,
    md_path: Path | None,
    plot_path: Path | None,
    provenance: Provenance,
    extra: dict | None = None,
) -> None:
    if json_path:
        with atomic_file(json_path) as tmp:
            doc = json_document({**(extra or {}), "benchmarks": rows}, provenance)
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    if md_path:
        with atomic_file(md_path) as tmp:
            tmp.write_text(markdown(rows) + f"\n{markdown_marker(provenance)}\n")
    if plot_path:
        plot(rows, plot_path, plot_title(rows, str((extra or {}).get("data", ""))), provenance)
