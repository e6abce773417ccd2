"""What every `fpewiden bench` run shares, MLPs and Hugging Face models alike: the measured model, ONNX
Runtime sessions, round-robin timing over workloads, and the summary rows.

All models are measured in one process, in one run, so ratios between them are meaningful on a noisy machine:
latency is taken round-robin over the models (every model's runs are spread over the same rounds).
"""

from __future__ import annotations

import gc
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fpewiden.benchmark.formats import best_format
from fpewiden.errors import FpewidenError

SPARSE_ENGINES = ("torch-2:4", "packed", "ort-packed")  # engines that run a sparse kernel


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@dataclass
class MeasuredModel:
    path: Path
    runners: dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # engine -> run(workload inputs)
    info: dict = field(default_factory=dict)
    decoders: dict[str, Any] = field(default_factory=dict)  # engine -> a model with .generate (causal LMs)
    label: str | None = None  # a row bench built itself (a quantized competitor); else named from `path`
    exported: Path | None = None  # its dense ONNX export, where bench made one (the ORT competitors quantize it)


@dataclass(frozen=True)
class Workload:
    """One timed shape: `key` names it in the results ("32", or "32x128" for batch × sequence length)."""

    key: str
    batch: int
    inputs: Any
    seq_len: int | None = None


def ort_session(path: Path, threads: int, device: torch.device | None = None):
    """ONNX Runtime on CPU, or with the CUDA execution provider (onnxruntime-gpu) when the device is CUDA."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FpewidenError("engine ort needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu)") from None
    from fpewiden.packed.ort import ort_reason, session_options

    packed_op = ort_reason() is None  # registered wherever it can run: a packed export needs it, others ignore it
    opts = session_options() if packed_op else ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # ONNX Runtime's idle threads spin-wait after each run, taking the cores from whatever bench times next
    # (two copies of MiniLM timed in turn with torch differed by 25% before this)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise FpewidenError("--device cuda with engine ort needs onnxruntime-gpu (pip install 'fpewiden[gpu]')")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        why = str(err).splitlines()[0]
        if "PackedMatMul" in why and not packed_op:
            why = f"it holds fpewiden's packed op, which is {ort_reason()}"
        raise FpewidenError(f"ONNX Runtime cannot load {path}: {why}") from None


def packed_onnx(model, kind: str, vocab: int, tmp: Path) -> Path:
    """The packed module exported for ONNX Runtime with fpewiden's op (needs the compiled kernels and the op)."""
    from fpewiden.export.packed import write_packed_onnx
    from fpewiden.packed import kernels
    from fpewiden.packed.ort import ort_reason

    reason = ort_reason() or (kernels.native_reason() if kernels.path() == "torch" else None)
    if reason is not None:
        raise FpewidenError(f"engine ort-packed: the packed kernels or their ONNX Runtime op are {reason}")
    return write_packed_onnx(model, kind, vocab, tmp / f"{len(list(tmp.iterdir()))}.packed.onnx")


def refuse_packed_onnx(path: Path, model) -> None:
    """bench counts an ONNX file's bytes from its dense or sparse weight matrices; a packed export has none, so
    its numbers come from the packed checkpoint it was exported from."""
    from fpewiden.packed.ort import uses_packed_op

    if uses_packed_op(model):
        raise FpewidenError(
            f"{path} is a packed export: bench the checkpoint it was packed from with --engines ort-packed (bench "
            "packs and exports it itself and counts its bytes)"
        )


AUTO_SECONDS = 1.0  # --repeat 0 (auto): about this long per model, engine and workload, as timeit's autorange
AUTO_MIN, AUTO_MAX = 15, 2000


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """The median and a distribution-free ~95% confidence interval for it: the order statistics whose ranks are
    n/2 ∓ z·√n/2 (the binomial sign-test interval), so no assumption about the shape of timing noise."""
    xs = sorted(values)
    n = len(xs)
    k = max(0, math.floor(n / 2 - z * math.sqrt(n) / 2))
    return statistics.median(xs), xs[k], xs[n - 1 - k]


def quantile(xs: list[float], q: float) -> float:
    """`q`-quantile of sorted `xs`, linear between ranks (numpy's default), so p10 ≤ median ≤ p90."""
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def plan_runs(repeat: int, per_round_s: float, jobs: int) -> int:
    """Timed runs per job: `repeat`, or (repeat 0) enough rounds for about AUTO_SECONDS per job."""
    if repeat > 0:
        return repeat
    return int(min(AUTO_MAX, max(AUTO_MIN, math.ceil(AUTO_SECONDS * jobs / max(per_round_s, 1e-9)))))


def time_entries(
    entries: list[MeasuredModel],
    workloads: list[Workload],
    repeat: int,
    warmup: int,
    say: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> None:
    """Latency of every (model, engine) on every workload, interleaved call by call.

    Each round runs every job once, in a fresh (seeded) random order, so a slow phase of a noisy machine lands on
    every model alike instead of on one model's block of runs, and no job always follows the same one (a job
    run right after a large model finds the caches full of that model's weights).
    Per job: median, p10, p90. Against the reference (the first model, same engine): the median of the
    per-round ratios of this model's time to the reference's (latency ×: below 1 is faster) and its 95% interval;
    a ratio whose interval holds 1 is `within_noise`, and reports show it as ≈1. `repeat` 0 chooses the runs
    from the time one round takes (AUTO_SECONDS per job). `say` receives progress lines (model, engine,
    workload, time left).
    """
    say = say or (lambda _msg: None)
    n_jobs = sum(len(e.runners) for e in entries)
    left_workloads = len(workloads)
    gc_was = gc.isenabled()
    gc.disable()  # a collection inside one model's call would be charged to that model
    try:
        for wi, w in enumerate(workloads):
            jobs = [(e, eng, run) for e in entries for eng, run in e.runners.items()]
            if not jobs:
                return
            cost = [0.0] * len(jobs)
            for j, (_, _, run) in enumerate(jobs):
                for k in range(max(1, warmup)):
                    t = clock()
                    run(w.inputs)
                    if k == max(1, warmup) - 1:
                        cost[j] = clock() - t
            per_round = sum(cost)
            n = plan_runs(repeat, per_round, len(jobs))
            left_workloads -= 1
            estimate = n * per_round
            later = left_workloads * (AUTO_SECONDS * n_jobs if repeat == 0 else estimate)
            auto = f" (--repeat 0: about {AUTO_SECONDS:g} s of runs each)" if repeat == 0 else ""
            say(
                f"timing {_shape(w)} ({wi + 1}/{len(workloads)}): {len(jobs)} model×engine runs × {n} rounds{auto}, "
                f"~{estimate:.0f} s; ~{estimate + later:.0f} s left"
            )
            times: list[list[float]] = [[] for _ in jobs]
            order = random.Random(wi)
            for _ in range(n):
                for j in order.sample(range(len(jobs)), len(jobs)):
                    run = jobs[j][2]
                    t = clock()
                    run(w.inputs)
                    times[j].append(clock() - t)
            ref = {eng: j for j, (e, eng, _) in enumerate(jobs) if e is entries[0]}
            for j, (e, eng, _) in enumerate(jobs):
                ts = sorted(times[j])
                med = statistics.median(ts)
                entry: dict[str, Any] = {
                    "median_ms": med * 1e3,
                    "p10_ms": quantile(ts, 0.1) * 1e3,
                    "p90_ms": quantile(ts, 0.9) * 1e3,
                    "items_per_sec": w.batch / med,
                    "runs": len(ts),
                    "sparse_path": eng in SPARSE_ENGINES,
                }
                if eng in ref:
                    ratios = [t / r for r, t in zip(times[ref[eng]], times[j], strict=True)]
                    ratio, lo, hi = median_ci(ratios)
                    entry["vs_reference"] = {"latency_ratio": ratio, "ci95": [lo, hi], "within_noise": lo <= 1.0 <= hi}
                if w.seq_len is not None:
                    entry.update(batch=w.batch, seq_len=w.seq_len, tokens_per_sec=w.batch * w.seq_len / med)
                e.info.setdefault("latency", {}).setdefault(eng, {})[w.key] = entry
    finally:
        if gc_was:
            gc.enable()


def _shape(w: Workload) -> str:
    return f"batch {w.batch}" + (f" × {w.seq_len} tokens" if w.seq_len is not None else "")


def sparse_path_note(latency: dict, kernel: str | None = None) -> str:
    """Which timed engines ran sparse kernels: `packed` (fpewiden's, on `kernel`) and torch's 2:4 path on CUDA."""
    ran = sorted({eng for eng, by_batch in latency.items() for v in by_batch.values() if v.get("sparse_path")})
    if kernel == "torch" and "packed" in ran:  # the pure-torch fallback multiplies the unpacked matrices
        ran.remove("packed")
    if ran:
        where = f" ({kernel} kernels)" if {"packed", "ort-packed"} & set(ran) and kernel else ""
        return f"{', '.join(ran)}{where} ran sparse kernels; torch and ONNX Runtime multiply dense matrices"
    return "no sparse kernel ran: torch multiplies dense matrices and ONNX Runtime densifies sparse initializers"


def weight_bytes(info: dict, engine: str) -> int | None:
    """The weight bytes an engine reads per call: dense fp32 for torch, the fast layout's where ONNX Runtime runs
    it, the packed ones for `packed`."""
    b = info["bytes"]
    if engine in ("packed", "ort-packed") and info.get("read_bytes") is not None:  # layers spread at load
        return info["read_bytes"]
    if b.get("stored") is not None:  # a quantized ONNX file: what it stores
        return b["stored"]
    if engine in ("packed", "ort-packed"):
        return b.get("packed")
    if engine == "ort" and info.get("ort_layout") == "fast":
        return b.get("block")
    return b.get("dense_fp32")


GENERIC_NAMES = {"model", "models", "checkpoint", "ckpt", "out", "output", "export", "student", "final", "onnx"}


def model_labels(paths: list[Path]) -> list[str]:
    """Names that tell every model apart, in full: the file or folder name (a file's suffix only where two would
    otherwise clash, as a folder and its ONNX export), with as many parent folders as it takes to make them
    unique, and at least one for a name that says nothing (a package's `model/` folder)."""
    names = [p.name if p.is_dir() else p.stem for p in paths]
    if len(set(names)) < len(names):
        names = [p.name for p in paths]
    parents = [p.resolve().parent.parts for p in paths]
    depth = [1 if n.lower() in GENERIC_NAMES else 0 for n in names]
    for _ in range(max((len(ps) for ps in parents), default=0) + 1):
        labels = ["/".join([*parents[i][len(parents[i]) - depth[i] :], names[i]]) for i in range(len(paths))]
        clash = {lb for lb in labels if labels.count(lb) > 1}
        if not clash:
            return labels
        for i, lb in enumerate(labels):
            if lb in clash and depth[i] < len(parents[i]) - 1:
                depth[i] += 1
    return [str(p) for p in paths]


def summarise(entries: list[MeasuredModel], threads: int) -> list[dict]:
    """Rows: the first model is the reference for the bytes bound and the measured speed-up."""
    ref = entries[0].info
    plain = [e for e in entries if e.label is None]
    names = dict(zip(map(id, plain), model_labels([e.path for e in plain]), strict=True))
    rows = []
    for e in entries:
        label = e.label or names[id(e)]
        i = e.info
        best = best_format(i["bytes"])
        row = {
            "model": label,
            "path": str(e.path),
            **{k: v for k, v in i.items() if k != "latency"},
            "best_format": best,
            "best_bytes": i["bytes"][best],
            "bound_vs_reference": ref["bytes"]["dense_fp32"] / i["bytes"][best],
            "latency": i.get("latency", {}),
            "threads": threads,
            "sparse_path_note": sparse_path_note(i.get("latency", {}), i.get("packed_kernel")),
        }
        for eng, lat in i.get("latency", {}).items():  # achieved weight bandwidth
            moved = weight_bytes(i, eng)
            for v in lat.values():
                if moved:
                    v["weight_gb_per_s"] = moved / (v["median_ms"] * 1e6)
        row["latency_vs_reference"] = {  # the median of paired per-round ratios (time_entries); below 1 is faster
            eng: {b: v["vs_reference"]["latency_ratio"] for b, v in lat.items() if "vs_reference" in v}
            for eng, lat in i.get("latency", {}).items()
        }
        rows.append(row)
    return rows
