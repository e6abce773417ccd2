"""Bench outputs: console table, JSON, Markdown and the accuracy-against-bytes plot with its Pareto front."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from fpewiden import __version__
from fpewiden.benchmark.formats import pareto_front
from fpewiden.io.atomic import atomic_file
from fpewiden.io.outputs import MD_MARKER, PNG_SOFTWARE, json_document

METRIC_ORDER = ("exact_match", "accuracy", "probe_accuracy", "cosine", "agreement", "perplexity", "mse", "loss")
LOWER_IS_BETTER = ("perplexity", "mse", "loss")


def main_metric(rows: list[dict]) -> str:
    """The first metric (in METRIC_ORDER) every model has: the one the Pareto front is drawn for."""
    common = [m for m in METRIC_ORDER if all(m in r["metrics"] for r in rows)]
    if not common:
        raise ValueError("the models share no metric")
    return common[0]


def front(rows: list[dict], metric: str) -> list[int]:
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    return pareto_front([(float(r["best_bytes"]), sign * r["metrics"][metric]) for r in rows])


def _latency_keys(rows: list[dict]) -> list[tuple[str, str]]:
    """(engine, workload) pairs; workloads are "batch" or "batchxseq", sorted by sequence length, then batch."""
    keys = {(eng, b) for r in rows for eng, lat in r["latency"].items() for b in lat}

    def order(k: tuple[str, str]) -> tuple:
        b, _, t = k[1].partition("x")
        return (k[0], int(t or 0), int(b))

    return sorted(keys, key=order)


def grid(rows: list[dict]) -> tuple[str, list[str], list[list[str]], set[int]]:
    """What the console table and the Markdown both show: the metric, the header, one row of cells per model
    and which models lie on the Pareto front."""
    metric = main_metric(rows)
    others = [m for m in METRIC_ORDER if m != metric and any(m in r["metrics"] for r in rows)]
    lat_keys = _latency_keys(rows)
    head = ["model", metric, *others, "neurons", "non-zeros", "dense fp32 bytes", "best format", "best bytes", "bound"]
    head += [f"{eng} {_workload(b)}: median ms (speed-up)" for eng, b in lat_keys]
    cells = []
    for r in rows:
        row = [
            r["model"],
            f"{r['metrics'][metric]:.4f}",
            *(f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for m in others),
            str(r["neurons"] if r["neurons"] is not None else "-"),
            f"{r['nnz']:,}",
            f"{r['bytes']['dense_fp32']:,}",
            r["best_format"],
            f"{r['best_bytes']:,}",
            f"{r['bound_vs_reference']:.2f}×",
        ]
        for eng, b in lat_keys:
            lat = r["latency"].get(eng, {}).get(b)
            sp = r["speedup_vs_reference"].get(eng, {}).get(b)
            row.append(f"{lat['median_ms']:.3f} ({sp:.2f}×)" if lat else "-")
        cells.append(row)
    return metric, head, cells, set(front(rows, metric))


def _workload(key: str) -> str:
    b, _, t = key.partition("x")
    return f"batch {b}" + (f" × {t} tokens" if t else "")


def table(rows: list[dict]) -> Table:
    metric, head, cells, on_front = grid(rows)
    t = Table(title=f"fpewiden bench: {metric} against bytes moved per inference (* Pareto front)")
    for c in head:
        t.add_column(c, justify="left" if c == "model" else "right")
    for i, row in enumerate(cells):
        t.add_row(("* " if i in on_front else "  ") + row[0], *row[1:])
    return t


def markdown(rows: list[dict]) -> str:
    _, head, cells, on_front = grid(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(cells):
        name = f"**{row[0]}** (Pareto)" if i in on_front else row[0]
        lines.append("| " + " | ".join([name, *row[1:]]) + " |")
    notes = sorted({r["sparse_path_note"] for r in rows})
    lines += [
        "",
        "Bytes: weights moved per inference, counted from the tensors. Bound: the first model's dense fp32 "
        "bytes over this model's best-format bytes (the speed-up a purely memory-bound engine could reach). "
        + " ".join(n[0].upper() + n[1:] + "." for n in notes),
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = main_metric(rows)
    xs = [r["best_bytes"] for r in rows]
    ys = [r["metrics"][metric] for r in rows]
    idx = front(rows, metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    ax.plot([xs[i] for i in idx], [ys[i] for i in idx], color="tab:red", lw=1.5, zorder=2, label="Pareto front")
    for r, x, y in zip(rows, xs, ys, strict=True):
        ax.annotate(r["model"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("weight bytes moved per inference (best format)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png", metadata={"Software": f"{PNG_SOFTWARE} {__version__}"})
    plt.close(fig)


def write(
    rows: list[dict], json_path: Path | None, md_path: Path | None, plot_path: Path | None, extra: dict | None = None
) -> None:
    if json_path:
        with atomic_file(json_path) as tmp:
            tmp.write_text(json.dumps(json_document({**(extra or {}), "benchmarks": rows}), indent=2) + "\n")
    if md_path:
        with atomic_file(md_path) as tmp:
            tmp.write_text(markdown(rows) + f"\n{MD_MARKER}\n")
    if plot_path:
        plot(rows, plot_path)
