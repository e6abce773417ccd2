"""Bench outputs: console table, JSON, Markdown and the plot (accuracy against bytes with its Pareto front, and
the measured latency beside it).

Speed-ups are the median of per-round paired ratios against the reference (benchmark/measure.py); one whose 95%
interval holds 1 is shown as ≈1, because the machine's noise cannot tell it from the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from fpewiden import __version__
from fpewiden.benchmark.formats import pareto_front
from fpewiden.io.atomic import atomic_file
from fpewiden.io.provenance import PLOT_FORMATS, Provenance, json_document, markdown_marker

METRIC_ORDER = ("exact_match", "accuracy", "probe_accuracy", "cosine", "agreement", "perplexity", "mse", "loss")
LOWER_IS_BETTER = ("perplexity", "mse", "loss")
REFERENCE = " (reference)"


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


def speedup_text(lat: dict) -> str:
    """`1.84×`, or `≈1` when the 95% interval of the paired ratio holds 1 (the reference itself: `1`)."""
    vs = lat.get("vs_reference")
    if vs is None:
        return "-"
    if vs["within_noise"]:
        return "≈1"
    return f"{vs['speedup']:.2f}×"


def model_label(row: dict, reference: bool) -> str:
    return row["model"] + (REFERENCE if reference else "")


def grid(rows: list[dict], detail: bool = False) -> tuple[str, list[str], list[list[str]], set[int]]:
    """What the console table and the Markdown both show: the metric, the header, one row of cells per model
    and which models lie on the Pareto front. `detail` adds each latency's p10–p90 and the ratio's interval."""
    metric = main_metric(rows)
    others = [m for m in METRIC_ORDER if m != metric and any(m in r["metrics"] for r in rows)]
    lat_keys = _latency_keys(rows)
    head = ["model", metric, *others, "neurons", "non-zeros", "dense fp32 bytes", "best format", "best bytes", "bound"]
    unit = "median ms [p10–p90] (speed-up, 95% interval)" if detail else "median ms (speed-up)"
    head += [f"{eng} {_workload(b)}: {unit}" for eng, b in lat_keys]
    decoders = sorted({eng for r in rows for eng in r.get("decode", {})})
    head += [f"{eng} decode, batch 1: tokens/s" for eng in decoders]
    cells = []
    for i, r in enumerate(rows):
        row = [
            model_label(r, i == 0),
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
            if lat is None:
                row.append("-")
                continue
            sp = "1" if i == 0 else speedup_text(lat)
            if detail:
                spread = f"[{lat['p10_ms']:.3f}–{lat['p90_ms']:.3f}]"
                vs = lat.get("vs_reference")
                ci = f", {vs['ci95'][0]:.2f}–{vs['ci95'][1]:.2f}" if vs is not None and i else ""
                row.append(f"{lat['median_ms']:.3f} {spread} ({sp}{ci})")
            else:
                row.append(f"{lat['median_ms']:.3f} ({sp})")
        for eng in decoders:
            d = r.get("decode", {}).get(eng)
            row.append(f"{d['tokens_per_sec']:.1f}" if d else "-")
        cells.append(row)
    return metric, head, cells, set(front(rows, metric))


def _workload(key: str) -> str:
    b, _, t = key.partition("x")
    return f"batch {b}" + (f" × {t} tokens" if t else "")


def table(rows: list[dict]) -> Table:
    metric, head, cells, on_front = grid(rows)
    t = Table(title=f"fpewiden bench: {metric} against bytes moved per inference (* Pareto front; ≈1: within noise)")
    width = max(len(c[0]) for c in cells) + 2
    for c in head:
        if c == "model":
            t.add_column(c, justify="left", no_wrap=True, min_width=width)
        else:
            t.add_column(c, justify="right", overflow="fold")  # wrap a number, never cut it
    for i, row in enumerate(cells):
        t.add_row(("* " if i in on_front else "  ") + row[0], *row[1:])
    return t


def markdown(rows: list[dict]) -> str:
    _, head, cells, on_front = grid(rows, detail=True)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(cells):
        name = f"**{row[0]}** (Pareto)" if i in on_front else row[0]
        lines.append("| " + " | ".join([name, *row[1:]]) + " |")
    notes = sorted({r["sparse_path_note"] for r in rows})
    threads = sorted({r["threads"] for r in rows})
    lines += [
        "",
        "Bytes: weights moved per inference, counted from the tensors. Bound: the first model's dense fp32 "
        "bytes over this model's best-format bytes (the speed-up a purely memory-bound engine could reach). "
        "Latency: models interleaved call by call; speed-up is the median of per-round ratios to the reference, "
        "≈1 where its 95% interval holds 1 (not distinguishable from the reference on this machine); "
        f"{', '.join(map(str, threads))} thread(s). " + " ".join(n[0].upper() + n[1:] + "." for n in notes),
    ]
    return "\n".join(lines) + "\n"


def check_plot_path(path: Path) -> str:
    """The format a plot path names (refused before any work when matplotlib cannot write it)."""
    from fpewiden.errors import FpewidenError

    fmt = PLOT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise FpewidenError(f"--plot {path}: name a .png, .svg, .pdf or .jpg file")
    return fmt


def place_labels(ax, xs: list[float], ys: list[float], texts: list[str]) -> None:
    """Annotate points so that no two labels overlap each other or a point, and where it can none runs past the
    axes' right edge (into the latency panel): each label takes the first of a few offsets (growing outwards)
    whose box is free and inside, with a leader line when it had to move away."""
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(list(zip(xs, ys, strict=True)))
    taken = [(px - 4, py - 4, px + 4, py + 4) for px, py in pts]
    offsets = [(5, 5), (5, -12), (-5, 5), (-5, -12)]
    offsets += [(dx, dy) for r in (18, 30, 44, 60, 80) for dx, dy in ((8, r), (8, -r), (-8, r), (-8, -r))]

    def label(i: int, dx: int, dy: int, leader: bool):
        arrow = {"arrowprops": {"arrowstyle": "-", "color": "0.6", "lw": 0.6}} if leader else {}
        return ax.annotate(
            texts[i],
            (xs[i], ys[i]),
            textcoords="offset points",
            xytext=(dx, dy),
            fontsize=7,
            ha="left" if dx >= 0 else "right",
            va="center",
            **arrow,
        )

    for i in sorted(range(len(xs)), key=lambda i: (pts[i][0], pts[i][1])):
        best: tuple[int, tuple, int, int] | None = None
        for dx, dy in offsets:
            ann = label(i, dx, dy, False)
            bb = ann.get_window_extent(renderer)
            ann.remove()
            box = (bb.x0 - 1, bb.y0 - 1, bb.x1 + 1, bb.y1 + 1)
            overlaps = sum(not (box[2] < b[0] or box[0] > b[2] or box[3] < b[1] or box[1] > b[3]) for b in taken)
            outside = box[2] > frame.x1  # past the right edge: into the latency panel
            clash = 2 * overlaps + outside  # an overlap is worse than leaving the axes, and both worse than neither
            if best is None or clash < best[0]:
                best = (clash, box, dx, dy)
            if clash == 0:
                break
        assert best is not None
        _, box, dx, dy = best
        label(i, dx, dy, abs(dy) > 12)
        taken.append(box)


def plot(rows: list[dict], path: Path, title: str = "", provenance: Provenance | None = None) -> None:
    """Left: the metric against best-format weight bytes (MB) with the Pareto front. Right: measured median
    latency per model (p10–p90 bars) at the smallest workload of every engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = check_plot_path(path)
    metric = main_metric(rows)
    labels = [model_label(r, i == 0) for i, r in enumerate(rows)]
    top = max(r["best_bytes"] for r in rows)
    unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("bytes", 1.0)) if top >= s)
    xs = [r["best_bytes"] / scale for r in rows]
    ys = [r["metrics"][metric] for r in rows]
    idx = front(rows, metric)
    keys = _latency_keys(rows)
    engines = sorted({e for e, _ in keys})
    first = {e: next(b for eng, b in keys if eng == e) for e in engines}
    fig, axes = plt.subplots(1, 2 if engines else 1, figsize=(12 if engines else 7, 4.8), squeeze=False)
    ax = axes[0][0]
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    ax.plot([xs[i] for i in idx], [ys[i] for i in idx], color="tab:red", lw=1.5, zorder=2, label="Pareto front")
    if max(xs) / max(min(xs), 1e-12) > 20:
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(6))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.margins(x=0.15, y=0.12)
    stored = any(r.get("best_format") == "stored" for r in rows)
    how = "best format; quantized: stored" if stored else "best exact format"
    ax.set_xlabel(f"weight bytes moved per inference, {unit} ({how})")
    ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if engines:
        lat_ax = axes[0][1]
        height = 0.8 / len(engines)
        for k, eng in enumerate(engines):
            meds, lo, hi, pos = [], [], [], []
            for i, r in enumerate(rows):
                lat = r["latency"].get(eng, {}).get(first[eng])
                if lat is None:
                    continue
                pos.append(i + (k - (len(engines) - 1) / 2) * height)
                meds.append(lat["median_ms"])
                lo.append(lat["median_ms"] - lat.get("p10_ms", lat["median_ms"]))
                hi.append(lat["p90_ms"] - lat["median_ms"])
            lat_ax.barh(pos, meds, height=height, xerr=[lo, hi], capsize=2, label=f"{eng}, {_workload(first[eng])}")
        lat_ax.set_yticks(range(len(rows)), labels, fontsize=7)
        lat_ax.invert_yaxis()
        lat_ax.set_xlabel("median latency, ms (bars: p10–p90)")
        lat_ax.grid(alpha=0.3, axis="x")
        lat_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=len(engines), fontsize=8, frameon=False)
    fig.suptitle(title or f"{metric} against weight bytes", fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()  # final layout and limits, so label boxes are measured where they will be drawn
    place_labels(ax, xs, ys, labels)
    token = provenance.token() if provenance is not None else f"fpewiden {__version__}"
    meta = {
        "png": {"metadata": {"Software": f"fpewiden {__version__}", "Comment": token}},
        "svg": {"metadata": {"Description": token}},
        "pdf": {"metadata": {"Subject": token}},
        "jpeg": {"pil_kwargs": {"comment": token.encode()}},
    }[fmt]
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format=fmt, **meta)
    plt.close(fig)


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
        task = (extra or {}).get("data", "")
        metric = main_metric(rows)
        title = f"{task}: {metric} against weight bytes, and measured latency" if task else ""
        plot(rows, plot_path, title, provenance)
