"""bench's figure, made for a reader: the metric against weight bytes with its Pareto front, then one panel per
measured workload with each model's latency × reference (95% intervals) per engine; a title that says what ran
where, the legend inside the figure, and no two labels on top of each other (`text_overlaps` checks)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from fpewiden import __version__
from fpewiden.benchmark.report import (
    LOWER_IS_BETTER,
    engines,
    front,
    interval,
    main_metric,
    model_label,
    short_name,
    workload_text,
    workloads,
)
from fpewiden.io.atomic import atomic_file
from fpewiden.io.provenance import PLOT_FORMATS, Provenance

PANELS = 4  # latency panels at most: the first workloads (the title names how many more were measured)


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


def _bytes_axis(ax, xs: list[float]) -> None:
    """Log where the bytes span more than 20×, linear otherwise; at most six labelled ticks, none on minor ones."""
    import matplotlib.ticker as mt

    if max(xs) / max(min(xs), 1e-12) > 20:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(mt.LogLocator(base=10, numticks=6))
        ax.xaxis.set_minor_formatter(mt.NullFormatter())
    else:
        ax.xaxis.set_major_locator(mt.MaxNLocator(5))
    ax.xaxis.set_major_formatter(mt.FuncFormatter(lambda v, _: f"{v:g}"))


def figure(rows: list[dict], title: str):
    """The figure (not yet saved): for tests to measure, for `plot` to write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = main_metric(rows)
    labels = [model_label(r, i == 0) for i, r in enumerate(rows)]
    top = max(r["best_bytes"] for r in rows)
    unit, scale = next((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3), ("bytes", 1.0)) if top >= s)
    xs = [r["best_bytes"] / scale for r in rows]
    ys = [r["metrics"][metric] for r in rows]
    engs = engines(rows)
    loads = workloads(rows)
    shown = loads[:PANELS]
    height = max(4.2, 1.6 + 0.22 * len(rows) * max(1, len(engs)))
    fig = plt.figure(figsize=(5.2 + 2.7 * len(shown), height), layout="constrained")
    grid = fig.add_gridspec(1, 1 + len(shown), width_ratios=[1.6] + [1.0] * len(shown))
    ax = fig.add_subplot(grid[0, 0])
    idx = front(rows, metric)
    ivs = [interval(r, metric) for r in rows]
    if any(ivs):
        lo = [y - iv[0] if iv else 0.0 for y, iv in zip(ys, ivs, strict=True)]
        hi = [iv[1] - y if iv else 0.0 for y, iv in zip(ys, ivs, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="none", ecolor="tab:blue", alpha=0.5, capsize=2, zorder=2)
    ax.scatter(xs, ys, color="tab:blue", zorder=3)
    (front_line,) = ax.plot([xs[i] for i in idx], [ys[i] for i in idx], color="tab:red", lw=1.5, zorder=2)
    _bytes_axis(ax, xs)
    ax.margins(x=0.15, y=0.15)
    stored = any(r.get("best_format") == "stored" for r in rows)
    ax.set_xlabel(f"weight bytes per inference, {unit}" + (" (quantized: as stored)" if stored else ""))
    ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    ax.set_title(f"{metric} against bytes", fontsize=9)
    ax.grid(alpha=0.3)
    handles, names = [front_line], ["Pareto front" + (" (steps beyond 95% intervals)" if any(ivs) else "")]
    palette = ("C1", "C2", "C4", "C5", "C6", "C8", "C9", "C7")  # not C0 (the points) nor C3 (the front's red)
    colours = {eng: palette[k % len(palette)] for k, eng in enumerate(engs)}
    first = None
    every = [
        v["vs_reference"]["latency_ratio"]
        for r in rows
        for lat in r["latency"].values()
        for key, v in lat.items()
        if key in shown and "vs_reference" in v
    ]
    log = bool(every) and max(every) / max(min(every), 1e-9) > 20
    for p, key in enumerate(shown):
        lat_ax = fig.add_subplot(grid[0, 1 + p], sharey=first, sharex=first)  # one scale: panels compare
        first = first or lat_ax
        bar_h = 0.8 / max(1, len(engs))
        for k, eng in enumerate(engs):
            pos, vals, lo, hi = [], [], [], []
            for i, r in enumerate(rows):
                lat = r["latency"].get(eng, {}).get(key)
                if lat is None:
                    continue
                vs = lat.get("vs_reference")
                v, (a, b) = (1.0, (1.0, 1.0)) if i == 0 or vs is None else (vs["latency_ratio"], vs["ci95"])
                pos.append(i + (k - (len(engs) - 1) / 2) * bar_h)
                vals.append(v)
                lo.append(max(v - a, 0.0))
                hi.append(max(b - v, 0.0))
            bars = lat_ax.barh(pos, vals, height=bar_h, xerr=[lo, hi], capsize=2, color=colours[eng])
            if p == 0:
                handles.append(bars)
                names.append(eng)
        lat_ax.axvline(1.0, color="0.3", lw=0.8, ls="--")
        if log:
            lat_ax.set_xscale("log")
        lat_ax.set_title(workload_text(key), fontsize=9)
        lat_ax.set_xlabel("latency × reference")
        lat_ax.grid(alpha=0.3, axis="x")
        lat_ax.set_yticks(range(len(rows)), [short_name(lb, 34) for lb in labels], fontsize=7)
        if p > 0:  # the panels share the models' axis: names once, on the first
            lat_ax.tick_params(labelleft=False)
    if first is not None:
        first.invert_yaxis()
    more = f" ({len(loads) - len(shown)} more workloads in the Markdown and JSON)" if len(loads) > len(shown) else ""
    # about 11 characters of a 10-point title per inch: 14 ran a long data spec past both edges
    fig.suptitle("\n".join(textwrap.wrap(title + more, width=int(11 * fig.get_figwidth())) or [""]), fontsize=10)
    fig.legend(handles, names, loc="outside lower center", ncol=min(len(names), 6), fontsize=8, frameon=False)
    fig.canvas.draw()  # final layout and limits, so label boxes are measured where they will be drawn
    fig.set_layout_engine("none")  # and kept there: the point labels below must not move the panels
    place_labels(ax, xs, ys, [short_name(lb, 34) for lb in labels])
    return fig


def _drawn_texts(fig) -> list:
    """The texts a reader sees: titles, axis labels, tick labels of ticks inside the view, annotations, legends."""
    out = [*fig.texts, *(t for lg in fig.legends for t in lg.get_texts())]
    if fig._suptitle is not None:
        out.append(fig._suptitle)
    for ax in fig.axes:
        out += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        if ax.get_legend() is not None:
            out += ax.get_legend().get_texts()
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            span = (hi - lo) * 1e-9
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if lo - span <= tick.get_loc() <= hi + span:
                    out += [lb for lb in (tick.label1, tick.label2) if lb.get_visible()]
    unique = {id(t): t for t in out}  # the suptitle is also one of the figure's texts
    return [t for t in unique.values() if t.get_visible() and t.get_text().strip()]


def text_overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes overlap (by more than a point), and texts reaching outside the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = fig.bbox
    boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in _drawn_texts(fig)]
    bad = [(txt, "outside the figure") for txt, bb in boxes if bb.x0 < frame.x0 - 1 or bb.x1 > frame.x1 + 1
           or bb.y0 < frame.y0 - 1 or bb.y1 > frame.y1 + 1]  # fmt: skip
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i][1], boxes[j][1]
            if min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1:
                bad.append((boxes[i][0], boxes[j][0]))
    return bad


def plot(rows: list[dict], path: Path, title: str = "", provenance: Provenance | None = None) -> None:
    import matplotlib.pyplot as plt

    fmt = check_plot_path(path)
    fig = figure(rows, title or f"{main_metric(rows)} against weight bytes, and measured latency")
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
