"""What every `fpewiden bench` run shares, MLPs and Hugging Face models alike: the measured model, ONNX
Runtime sessions, round-robin timing over workloads, and the summary rows.

All models are measured in one process, in one run, so ratios between them are meaningful on a noisy machine:
latency is taken round-robin over the models (every model's runs are spread over the same rounds).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fpewiden.benchmark.formats import best_format
from fpewiden.errors import FpewidenError

ENGINES = ("torch", "ort")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@dataclass
class MeasuredModel:
    label: str
    path: Path
    runners: dict[str, Callable[[Any], Any]] = field(default_factory=dict)  # engine -> run(workload inputs)
    info: dict = field(default_factory=dict)


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
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise FpewidenError("--device cuda with engine ort needs onnxruntime-gpu (pip install 'fpewiden[gpu]')")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as err:  # onnxruntime raises its own exception types
        raise FpewidenError(f"ONNX Runtime cannot load {path}: {str(err).splitlines()[0]}") from None


def time_entries(
    entries: list[MeasuredModel], workloads: list[Workload], repeat: int, warmup: int, rounds: int = 5
) -> None:
    """Median and p90 latency per engine and workload over exactly `repeat` timed runs each, spread over
    `rounds` round-robin passes through the models (so slow drifts of the machine hit every model alike)."""
    rounds = max(1, min(rounds, repeat))
    per_round = [repeat // rounds + (1 if r < repeat % rounds else 0) for r in range(rounds)]
    for w in workloads:
        jobs = [(e, eng, run) for e in entries for eng, run in e.runners.items()]
        times: dict[tuple[int, str], list[float]] = {(id(e), eng): [] for e, eng, _ in jobs}
        for _, _, run in jobs:
            for _ in range(warmup):
                run(w.inputs)
        for n in per_round:
            for e, eng, run in jobs:
                for _ in range(n):
                    t = time.perf_counter()
                    run(w.inputs)
                    times[(id(e), eng)].append(time.perf_counter() - t)
        for e, eng, _ in jobs:
            ts = sorted(times[(id(e), eng)])
            med = statistics.median(ts)
            entry = {
                "median_ms": med * 1e3,
                "p90_ms": ts[int(0.9 * (len(ts) - 1))] * 1e3,
                "items_per_sec": w.batch / med,
                "runs": len(ts),
                "sparse_path": eng == "torch-2:4",
            }
            if w.seq_len is not None:
                entry.update(batch=w.batch, seq_len=w.seq_len, tokens_per_sec=w.batch * w.seq_len / med)
            e.info.setdefault("latency", {}).setdefault(eng, {})[w.key] = entry


def sparse_path_note(latency: dict) -> str:
    """Whether any timed engine ran a sparse kernel (today only torch's 2:4 semi-structured path on CUDA)."""
    ran = sorted({eng for eng, by_batch in latency.items() for v in by_batch.values() if v.get("sparse_path")})
    if ran:
        return f"{', '.join(ran)} ran sparse kernels; the other engines multiply dense matrices"
    return "no sparse kernel ran: torch multiplies dense matrices and ONNX Runtime densifies sparse initializers"


def summarise(entries: list[MeasuredModel], threads: int) -> list[dict]:
    """Rows: the first model is the reference for the bytes bound and the measured speed-up."""
    ref = entries[0].info
    rows = []
    for e in entries:
        i = e.info
        best = best_format(i["bytes"])
        row = {
            "model": e.label,
            "path": str(e.path),
            **{k: v for k, v in i.items() if k != "latency"},
            "best_format": best,
            "best_bytes": i["bytes"][best],
            "bound_vs_reference": ref["bytes"]["dense_fp32"] / i["bytes"][best],
            "latency": i.get("latency", {}),
            "threads": threads,
            "sparse_path_note": sparse_path_note(i.get("latency", {})),
        }
        row["speedup_vs_reference"] = {
            eng: {
                b: ref["latency"][eng][b]["median_ms"] / v["median_ms"]
                for b, v in lat.items()
                if eng in ref.get("latency", {}) and b in ref["latency"][eng]
            }
            for eng, lat in i.get("latency", {}).items()
        }
        rows.append(row)
    return rows
