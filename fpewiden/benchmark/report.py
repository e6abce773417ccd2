"""What bench reports, as text: a console summary that fits 100 columns and Markdown laid out long.

One wording of speed everywhere: "latency ×", a model's time over the reference's in the same engine and
workload (below 1 is faster), the median of per-round paired ratios (benchmark/measure.py). One whose 95%
interval holds 1 reads ≈1: this machine's noise cannot tell it from the reference.
"""

from __future__ import annotations

from rich import box
from rich.table import Table

from fpewiden.benchmark.formats import pareto_front
from fpewiden.benchmark.measure import sparse_path_note
from fpewiden.significance import proportion_interval

METRIC_ORDER = ("exact_match", "accuracy", "probe_accuracy", "cosine", "agreement", "perplexity", "mse", "loss")
LOWER_IS_BETTER = ("perplexity", "mse", "loss")
REFERENCE = " (reference)"
CONSOLE_WIDTH = 100
CONSOLE_WORKLOADS = 4  # latency columns in the console; every workload is in the Markdown and JSON
NAME_WIDTH = 30


def main_metric(rows: list[dict]) -> str:
    """The first metric (in METRIC_ORDER) every model has: the one the Pareto front is drawn for."""
    common = [m for m in METRIC_ORDER if all(m in r["metrics"] for r in rows)]
    if not common:
        raise ValueError("the models share no metric")
    return common[0]


PROPORTIONS = ("exact_match", "accuracy", "probe_accuracy")  # shares of held-out samples: Wilson intervals


def interval(row: dict, metric: str) -> tuple[float, float] | None:
    """The metric's 95% interval from the held-out sample count (proportions only); None where none is known."""
    n = row.get("metric_samples", {}).get(metric)
    if metric not in PROPORTIONS or not n:
        return None
    return proportion_interval(row["metrics"][metric], n)


def front(rows: list[dict], metric: str) -> list[int]:
    """The Pareto front of the metric against bytes, by bytes, through steps that are real: where intervals are
    known, a point joins only if its interval clears the last point kept (more bytes must buy a difference a
    new draw of the test set would not undo)."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    idx = pareto_front([(float(r["best_bytes"]), sign * r["metrics"][metric]) for r in rows])
    kept: list[int] = []
    for i in idx:
        if kept:
            a, b = interval(rows[kept[-1]], metric), interval(rows[i], metric)
            if a is not None and b is not None and b[0] <= a[1]:
                continue  # not distinguishable from a smaller model already on the front
        kept.append(i)
    return kept


def engines(rows: list[dict]) -> list[str]:
    return sorted({eng for r in rows for eng in r["latency"]})


def workloads(rows: list[dict]) -> list[str]:
    """Workload keys ("batch" or "batchxseq"), by sequence length, then batch."""
    keys = {b for r in rows for lat in r["latency"].values() for b in lat}

    def order(k: str) -> tuple[int, int]:
        b, _, t = k.partition("x")
        return int(t or 0), int(b)

    return sorted(keys, key=order)


def workload_text(key: str, short: bool = False) -> str:
    b, _, t = key.partition("x")
    if short:
        return f"{b}×{t}" if t else f"batch {b}"
    return f"batch {b}" + (f" × {t} tokens" if t else "")


def ratio_text(lat: dict | None, reference: bool = False) -> str:
    """`0.54×`, `≈1` when its 95% interval holds 1, `1` for the reference itself, `-` where nothing ran."""
    if lat is None:
        return "-"
    if reference:
        return "1"
    vs = lat.get("vs_reference")
    if vs is None:
        return "-"
    return "≈1" if vs["within_noise"] else f"{vs['latency_ratio']:.2f}×"


def model_label(row: dict, reference: bool) -> str:
    return row["model"] + (REFERENCE if reference else "")


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """A name cut in the middle to `width` characters (its folder's start and its own end both stay readable)."""
    if len(name) <= width:
        return name
    keep = width - 1
    return name[: keep // 2] + "…" + name[len(name) - (keep - keep // 2) :]


def human_bytes(n: float) -> str:
    unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("B", 1.0)) if n >= s or s == 1.0)
    return f"{n / scale:.3g} {unit}"


def sparse_note(rows: list[dict]) -> str:
    """One note for the whole run (a note per model contradicted itself when some models ran sparse kernels)."""
    merged: dict[str, dict] = {}
    for r in rows:
        for eng, by_workload in r["latency"].items():
            merged.setdefault(eng, {}).update({f"{r['model']}/{k}": v for k, v in by_workload.items()})
    kernel = next((r["packed_kernel"] for r in rows if r.get("packed_kernel")), None)
    note = sparse_path_note(merged, kernel)
    return note[0].upper() + note[1:] + "."


def notes(rows: list[dict]) -> list[str]:
    threads = ", ".join(map(str, sorted({r["threads"] for r in rows if "threads" in r}))) or "?"
    out = [
        "Latency ×: each model's time over the reference's in the same engine and workload, median of per-round "
        "paired ratios (below 1 is faster); ≈1 where its 95% interval holds 1 (not distinguishable here); "
        f"{threads} thread(s).",
        "Bytes: weights moved per inference, counted from the tensors (quantized files: as stored); bound: the "
        "reference's dense fp32 bytes over the model's.",
    ]
    metric = main_metric(rows)
    if any(interval(r, metric) for r in rows):
        out.append(
            f"Pareto front: a larger model joins it only where its {metric}'s 95% interval (Wilson, from the "
            "held-out sample count) clears the last smaller model's: closer points are not distinguishable."
        )
    if any(r["latency"] for r in rows):
        out.append(sparse_note(rows))
    if spread := spread_note(rows):
        out.append(spread)
    return out


def spread_note(rows: list[dict]) -> str | None:
    """Where packed layers run spread (the avx2 kernels), what an inference reads instead of the stored bytes."""
    spread = [r for r in rows if r.get("read_bytes") is not None]
    if not spread:
        return None
    read = ", ".join(f"{r['model']} {human_bytes(r['read_bytes'])}" for r in spread)
    return (
        f"On the {spread[0].get('packed_kernel')} kernels int8 and int4 bitmask layers run their values spread to "
        f"the dense layout (faster there: bench/results/quantized/avx2_spread): an inference reads the spread "
        f"bytes, not the file's ({read}; weight GB/s counts these)."
    )


def console_table(rows: list[dict]) -> Table:
    """One row per model and engine, a column per workload (the first CONSOLE_WORKLOADS): fits 100 columns."""
    metric = main_metric(rows)
    on_front = set(front(rows, metric))
    shown = workloads(rows)[:CONSOLE_WORKLOADS]
    decoders = sorted({eng for r in rows for eng in r.get("decode", {})})
    title = f"fpewiden bench: {metric}, weight bytes and latency × reference (* Pareto front)"
    t = Table(
        title=title,
        min_width=len(title),  # a table narrower than its title would wrap the title
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
        title_justify="left",
    )
    t.add_column("model", no_wrap=True, max_width=NAME_WIDTH + 2)
    t.add_column(metric, justify="right", no_wrap=True)
    t.add_column("weights", justify="right", no_wrap=True)
    t.add_column("engine", no_wrap=True)
    for key in shown:
        t.add_column(workload_text(key, short=True), justify="right", no_wrap=True)
    if decoders:
        t.add_column("tok/s", justify="right", no_wrap=True)
    for i, r in enumerate(rows):
        name = ("* " if i in on_front else "  ") + short_name(model_label(r, i == 0))
        head = [name, f"{r['metrics'][metric]:.4f}", human_bytes(r["best_bytes"])]
        engs = sorted(set(r["latency"]) | set(r.get("decode", {}))) or ["-"]
        for k, eng in enumerate(engs):
            lat = r["latency"].get(eng, {})
            cells = [ratio_text(lat.get(key), i == 0) for key in shown]
            if decoders:
                d = r.get("decode", {}).get(eng)
                cells.append(f"{d['tokens_per_sec']:.1f}" if d else "-")
            t.add_row(*(head if k == 0 else ["", "", ""]), eng, *cells, end_section=k == len(engs) - 1)
    more = len(workloads(rows)) - len(shown)
    caption = notes(rows)[0] + (f" {more} more workload(s) in --markdown and --json." if more > 0 else "")
    caption += f" {spread}" if (spread := spread_note(rows)) else ""
    t.caption, t.caption_justify = caption, "left"
    return t


def markdown(rows: list[dict]) -> str:
    """Three tables, laid out long: the models (one row each), latency (one row per model × engine × workload),
    and decode where it was measured; then the notes."""
    metric = main_metric(rows)
    on_front = set(front(rows, metric))
    others = [m for m in METRIC_ORDER if m != metric and any(m in r["metrics"] for r in rows)]
    head = ["model", metric, *others, "neurons", "non-zeros", "dense fp32 bytes", "best format", "best bytes", "bound"]
    lines = ["## Models (**bold**: on the Pareto front of " + metric + " against bytes)", "", _md_row(head)]
    lines.append("|" + "---|" * len(head))
    for i, r in enumerate(rows):
        label = model_label(r, i == 0)
        lines.append(
            _md_row(
                [
                    f"**{label}** (Pareto)" if i in on_front else label,
                    _with_interval(r, metric),
                    *(f"{r['metrics'][m]:.4f}" if m in r["metrics"] else "-" for m in others),
                    str(r["neurons"] if r.get("neurons") is not None else "-"),
                    f"{r['nnz']:,}",
                    f"{r['bytes']['dense_fp32']:,}",
                    r["best_format"],
                    f"{r['best_bytes']:,}",
                    f"{r['bound_vs_reference']:.2f}×",
                ]
            )
        )
    if any(r["latency"] for r in rows):
        head = ["model", "engine", "workload", "median ms", "p10–p90 ms", "latency ×", "95% interval", "weight GB/s"]
        lines += ["", "## Latency", "", _md_row(head), "|" + "---|" * len(head)]
        for eng in engines(rows):
            for key in workloads(rows):
                for i, r in enumerate(rows):
                    lat = r["latency"].get(eng, {}).get(key)
                    if lat is None:
                        continue
                    vs = lat.get("vs_reference")
                    ci = f"{vs['ci95'][0]:.2f}–{vs['ci95'][1]:.2f}" if vs is not None and i else "-"
                    gbs = lat.get("weight_gb_per_s")
                    lines.append(
                        _md_row(
                            [
                                model_label(r, i == 0),
                                eng,
                                workload_text(key),
                                f"{lat['median_ms']:.3f}",
                                f"{lat['p10_ms']:.3f}–{lat['p90_ms']:.3f}",
                                ratio_text(lat, i == 0),
                                ci,
                                f"{gbs:.2f}" if gbs else "-",
                            ]
                        )
                    )
    if any(r.get("decode") for r in rows):
        lines += ["", "## Decode, batch 1", "", _md_row(["model", "engine", "tokens/s"]), "|---|---|---|"]
        for i, r in enumerate(rows):
            for eng, d in sorted(r.get("decode", {}).items()):
                lines.append(_md_row([model_label(r, i == 0), eng, f"{d['tokens_per_sec']:.1f}"]))
    lines += ["", *notes(rows)]
    return "\n".join(lines) + "\n"


def _with_interval(row: dict, metric: str) -> str:
    iv = interval(row, metric)
    value = f"{row['metrics'][metric]:.4f}"
    return value + (f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else "")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
