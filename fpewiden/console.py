"""Rich tables and progress bars: presentation only, so the commands stay thin and the logic stays testable."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table


def console(max_width: int | None = None) -> Console:
    """Wide enough for the tables when stdout is a pipe (rich would fall back to 80 columns); `max_width` caps it
    for tables laid out to fit (bench's summary: 100 columns)."""
    c = Console() if sys.stdout.isatty() else Console(width=160)
    return Console(width=max_width) if max_width is not None and c.width > max_width else c


class LoggedProgress(Progress):
    """A rich Progress that, where stderr is not a terminal (a log file, CI, nohup), says the same in plain lines
    instead of redrawing nothing: a line per task at most every PERIOD seconds and when it completes, and while no
    update comes (one long step), a line every HEARTBEAT seconds that it is still at work, so no step is silent."""

    PERIOD = 10.0
    HEARTBEAT = 25.0

    def __init__(self, *columns, plain: bool, unit: str = "", **kwargs):
        super().__init__(*columns, **kwargs)
        self.plain, self.unit = plain, unit
        self._said: dict = {}
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True) if plain else None

    def __enter__(self) -> LoggedProgress:
        super().__enter__()
        if self._beat is not None:
            self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        super().__exit__(*exc)

    def _amount(self, x: float | None) -> str:
        if x is None:
            return "?"
        if self.unit != "bytes":
            return f"{x:,.0f}"
        return f"{x / 1e6:,.1f} MB" if x >= 1e5 else f"{x / 1e3:,.1f} kB"

    def _say(self, line: str) -> None:
        self._last = time.monotonic()
        print(line, file=sys.stderr, flush=True)

    def _report(self, task_id) -> None:
        task = self._tasks[task_id]
        done = task.total is not None and task.completed >= task.total
        now = time.monotonic()
        last = self._said.get(task_id)
        if last == "done" or (last is not None and not done and now - last < self.PERIOD):
            return
        self._said[task_id] = "done" if done else now
        line = f"{task.description}: {self._amount(task.completed)} of {self._amount(task.total)}"
        elapsed = task.elapsed or 0.0
        line += f", {elapsed:.0f} s"
        if not done and task.total and task.completed:
            line += f", about {elapsed * (task.total - task.completed) / task.completed:.0f} s left"
        self._say(line)

    def _heartbeat(self) -> None:
        while not self._stop.wait(1.0):
            if time.monotonic() - self._last >= self.HEARTBEAT and self._tasks:
                task = self._tasks[max(self._tasks)]
                self._say(f"{task.description}: still at work, {task.elapsed or 0.0:.0f} s")

    def update(self, task_id, **kwargs) -> None:
        super().update(task_id, **kwargs)
        if self.plain:
            self._report(task_id)

    def advance(self, task_id, advance: float = 1) -> None:
        super().advance(task_id, advance)
        if self.plain:
            self._report(task_id)


def progress_bar(disable: bool = False) -> Progress:
    """Progress on stderr: a bar on a terminal, plain periodic lines elsewhere (LoggedProgress)."""
    return LoggedProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=disable or not sys.stderr.isatty(),
        plain=not disable and not sys.stderr.isatty(),
    )


def bytes_bar(disable: bool = False) -> Progress:
    """Progress in bytes with rate and time left: for work measured in the bytes it reads (convert)."""
    return LoggedProgress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
        disable=disable or not sys.stderr.isatty(),
        plain=not disable and not sys.stderr.isatty(),
        unit="bytes",
    )


def convert_table(report: dict) -> Table:
    meta = report["metadata"]
    t = Table(title=f"{report['dst']}  (α={meta['alpha']}, split={meta['split']}, budget={meta['budget_spec']})")
    for col in ("layer", "neurons", "W_in non-zeros", "W_out non-zeros"):
        t.add_column(col, justify="right" if col != "layer" else "left")
    for r in report["layers"]:
        t.add_row(
            r["name"],
            f"{r['neurons_before']} → {r['neurons_after']}",
            f"{r['nnz_in_before']} → {r['nnz_in_after']}",
            f"{r['nnz_out_before']} → {r['nnz_out_after']}",
        )
    t.add_row("total (each matrix once)", "", f"{report['nnz_before']} → {report['nnz_after']}", "", style="bold")
    return t


def inspect_table(report: dict) -> Table:
    t = Table(title=f"{report['path']}: {report['what']}")
    cols = ("layer", "W_in shape", "neurons", "W_in non-zeros", "W_out non-zeros", "density", "capacity", "mean |cos|")
    for col in cols:
        t.add_column(col, justify="left" if col == "layer" else "right", no_wrap=col == "layer")
    for r in report["layers"]:
        neurons = str(r["neurons"])
        if r["neurons"] != r["neurons_before"]:
            neurons = f"{r['neurons_before']} → {neurons}"
        t.add_row(
            r["name"],
            "x".join(map(str, r["in_shape"])),
            neurons,
            str(r["nnz_in"]),
            str(r["nnz_out"]),
            f"{r['density']:.3f}",
            f"{r['feature_capacity']:.3f}",
            f"{r['mean_abs_cosine']:.3f}" + ("*" if r["cosine_sampled"] else ""),
        )
    tot = report["totals"]
    t.add_row(
        "total (each matrix once)",
        "",
        str(tot["neurons"]),
        str(tot["nnz"]),
        "",
        f"{tot['density']:.3f}",
        "",
        "",
        style="bold",
    )
    return t


def results_table(
    title: str,
    summary: list[dict],
    metrics: list[str],
    difference: str | None = None,
    cell: Callable[[dict], str] | None = None,
) -> Table:
    """Mean ± std over seeds per model, and (`difference`) each model's paired difference to dense."""
    t = Table(
        title=f"{title}: mean ± std over seeds" + (f"; {difference}" if difference else ""),
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
        collapse_padding=True,
    )
    for col in ("model", "neurons", "non-zeros", *metrics):
        short = col.replace(f"{metrics[0]}_at_conversion", "at conversion") if metrics else col
        t.add_column(short, justify="left" if col == "model" else "right", no_wrap=col != "model")
    if difference:
        t.add_column("Δ vs dense", justify="right", no_wrap=True)
        t.caption = "≈: not distinguishable from dense (the 95% interval of the paired difference holds 0)"
    for s in summary:
        t.add_row(
            s["model"],
            str(s["neurons"]),
            str(s["nnz"]),
            *[f"{s[m]['mean']:.4f} ± {s[m]['std']:.4f}" if m in s else "" for m in metrics],
            *([cell(s)] if difference and cell else []),
        )
    return t


def export_table(r: dict) -> Table:
    t = Table(title=f"{r['out']}  (layout {r['layout']}, {r['dtype']}, opset {r['opset']})", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("file size", f"{r['file_bytes']:,} B")
    t.add_row("weight bytes", f"{r['weight_bytes']:,} B")
    if r["sparse_initializers"]:
        t.add_row("sparse initializers", f"{r['sparse_initializers']} ({r['sparse_initializer_bytes']:,} B)")
    t.add_row("nodes", str(r["nodes"]))
    t.add_row("operators", ", ".join(f"{k}×{v}" for k, v in r["ops"].items()))
    if "verify" in r:
        v = r["verify"]
        t.add_row(
            "verified vs PyTorch",
            f"max abs {v['max_abs_error']:.2e}, rel {v['max_rel_error']:.2e} (tolerance {v['tolerance']:g})",
        )
    else:
        t.add_row("verified vs PyTorch", "skipped (--no-verify)")
    return t


def status_lines(prefix: str) -> Callable[[str], None]:
    """A progress reporter for long work that must be visible in logs too: one line per step on stderr,
    terminal or not (a redrawn bar would show nothing when stderr is a file)."""

    def say(message: str) -> None:
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)

    return say


VALUE_NAMES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16", "I8": "int8", "U8": "int4"}  # packed values' dtypes


def pack_table(report: dict) -> Table:
    """Per Linear weight (and int8 embedding table): the format chosen and the bytes it stores, against dense."""
    t = Table(title=f"{report['dst']}: packed")
    for col in ("matrix", "format", "values", "non-zeros", "dense bytes", "packed bytes", "ratio"):
        t.add_column(col, justify="left" if col == "matrix" else "right", no_wrap=col == "matrix")
    for r in report["matrices"]:
        nnz = "-" if r["nnz"] is None else f"{r['nnz']:,}"
        values = VALUE_NAMES.get(r.get("dtype", ""), r.get("dtype", "-"))
        t.add_row(r["name"], r["format"], values, nnz, f"{r['dense_bytes']:,}", f"{r['packed_bytes']:,}",
                  f"{r['packed_bytes'] / max(1, r['dense_bytes']):.3f}")  # fmt: skip
    d, p = report["dense_bytes"], report["packed_bytes"]
    what = "Linear weights" + (
        ", embedding tables" if any(r["format"] == "embedding" for r in report["matrices"]) else ""
    )
    t.add_row(f"total ({what})", "", "", "", f"{d:,}", f"{p:,}", f"{p / max(1, d):.3f}", style="bold")
    return t
