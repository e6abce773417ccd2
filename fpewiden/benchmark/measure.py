"""Measure models for `fpewiden bench`: task metric, sizes, bytes per format, latency per engine and batch size.

All models are measured in one process, in one run, so ratios between them are meaningful on a noisy machine:
latency is taken round-robin over the models (every model's runs are spread over the same rounds).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fpewiden.arch import find_pairs
from fpewiden.benchmark.formats import best_format, model_bytes
from fpewiden.data.labels import evaluate, metrics_from_logits
from fpewiden.data.specs import Dataset
from fpewiden.errors import FpewidenError
from fpewiden.export.structure import find_blocks

ENGINES = ("torch", "ort")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@dataclass
class MeasuredModel:
    label: str
    path: Path
    runners: dict[str, object] = field(default_factory=dict)  # engine -> callable(np batch) -> np outputs
    info: dict = field(default_factory=dict)


def _check_width(entry: MeasuredModel, n_in: int, data: Dataset) -> None:
    if n_in != data.n_inputs:
        raise FpewidenError(f"{entry.path} reads {n_in} input features but {data.spec} has {data.n_inputs}")


def _ort_runner(path: Path, threads: int, device: torch.device | None = None):
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
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    names = [i.name for i in sess.get_inputs()]
    if names != ["x"]:
        raise FpewidenError(f"{path} takes inputs {names}; fpewiden bench feeds one input named x from DATA")
    return lambda x: sess.run(None, {"x": x})[0]


def _from_checkpoint(
    path: Path, data: Dataset, engines: list[str], device: torch.device, tmp: Path, threads: int
) -> MeasuredModel:
    from fpewiden.export.export import export
    from fpewiden.model.loaded import load_model

    tr = load_model(path)
    if tr.ck.kind == "hf":
        raise FpewidenError(f"{path}: fpewiden bench measures MLP checkpoints and MLP ONNX files")
    e = MeasuredModel(path.stem if path.suffix else path.name, path)
    _check_width(e, tr.n_inputs, data)
    tensors = tr.tensors()
    weights = {n: t for n, t in tensors.items() if t.dim() == 2}
    masks = {n: tr.masks.get(n, t != 0) for n, t in weights.items()}
    meta = tr.ck.meta
    blocks = None
    pairs = find_pairs(tr.ck)
    if meta.split == "shared" and meta.outgoing == "grouped" and meta.alpha and len(pairs) == 1:
        p = pairs[0]
        try:  # the block format and the fast export exist only where the structure really holds
            find_blocks(
                tensors[p.in_weights[0]],
                masks[p.in_weights[0]],
                None,
                tensors[p.out_weight],
                masks[p.out_weight],
                meta.alpha,
            )
            blocks = [(p.in_weights[0], p.out_weight, meta.alpha)]
        except FpewidenError as err:
            e.info["block_layout"] = f"not applicable: {err}"
    vectors = sum(t.numel() for t in tensors.values() if t.dim() == 1)
    e.info.update(
        kind="checkpoint",
        neurons=sum(tensors[p.in_weights[0]].shape[0] for p in pairs),
        nnz=sum(int(torch.count_nonzero(m)) for m in masks.values()),
        params=sum(t.numel() for t in tensors.values()),
        bytes=model_bytes(masks, vectors, blocks),
        fpewiden={k: getattr(meta, k) for k in ("alpha", "split", "outgoing", "budget_spec") if getattr(meta, k)},
    )
    if "ort" in engines:  # exported from the model already loaded, before it moves to the device
        layout = "fast" if blocks else "dense"
        onnx_path = tmp / f"{len(list(tmp.iterdir()))}.onnx"
        export(path, onnx_path, layout, verify=False, model=tr)
        e.info["ort_layout"] = layout
        e.runners["ort"] = _ort_runner(onnx_path, threads, device)
    model = tr.model.eval().to(device)
    e.info["metrics"] = evaluate(model, data.x_val, data.y_val, data.kind)
    if "torch" in engines:

        def run_torch(x: np.ndarray, model=model) -> np.ndarray:
            with torch.inference_mode():
                out = model(torch.from_numpy(x).to(device))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return out.cpu().numpy()

        e.runners["torch"] = run_torch
    if "torch" in engines and device.type == "cuda":
        _add_semi_structured(e, tr, masks, device)
    return e


def _add_semi_structured(e: MeasuredModel, tr, masks: dict[str, torch.Tensor], device: torch.device) -> None:
    """On CUDA, an fp16 copy whose 2:4-compatible weights use torch's semi-structured sparse kernels.

    GPU only and not run in CI (no GPU there); where it cannot apply, the reason is recorded instead.
    """
    from fpewiden.benchmark.formats import is_2_4

    eligible = [n for n, m in masks.items() if is_2_4(m)]
    if not eligible:
        e.info["torch_2_4"] = "no weight matrix has a 2:4 pattern"
        return
    try:
        import copy

        from torch.sparse import to_sparse_semi_structured

        model = copy.deepcopy(tr.model).half().to(device).eval()
        for name, p in zip(model.named_weights(), model.weights, strict=True):
            if name in eligible:
                p.data = to_sparse_semi_structured(p.data)
    except (RuntimeError, ImportError, ValueError) as err:
        e.info["torch_2_4"] = f"semi-structured kernels unavailable: {str(err).splitlines()[0]}"
        return

    def run(x: np.ndarray, model=model) -> np.ndarray:
        with torch.inference_mode():
            out = model(torch.from_numpy(x).to(device).half())
            torch.cuda.synchronize()
            return out.float().cpu().numpy()

    e.info["torch_2_4"] = f"semi-structured weights: {eligible}"
    e.runners["torch-2:4"] = run


def _from_onnx(path: Path, data: Dataset, engines: list[str], threads: int) -> MeasuredModel:
    from onnx import numpy_helper

    e = MeasuredModel(path.stem, path)
    if "ort" not in engines:
        raise FpewidenError(f"{path} is an ONNX file: measure it with --engines ort")
    model = _load_onnx(path)
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    for sp in model.graph.sparse_initializer:
        dense = np.zeros(int(np.prod(sp.dims)), dtype=np.float32)
        dense[numpy_helper.to_array(sp.indices).reshape(-1)] = numpy_helper.to_array(sp.values)
        arrays.append(dense.reshape(tuple(sp.dims)))
    mats = {
        str(i): torch.from_numpy(np.asarray(a, dtype=np.float32) != 0)
        for i, a in enumerate(arrays)
        if a.ndim == 2 and a.dtype.kind == "f"
    }
    vectors = sum(a.size for a in arrays if a.ndim == 1 and a.dtype.kind == "f")
    run = _ort_runner(path, threads)
    x0 = data.x_val[:1].numpy()
    try:
        run(x0)
    except Exception as err:  # onnxruntime raises its own exception types
        raise FpewidenError(f"{path} cannot run on {data.spec}: {str(err).splitlines()[0]}") from None
    logits = torch.from_numpy(
        np.concatenate([run(data.x_val[i : i + 4096].numpy()) for i in range(0, len(data.x_val), 4096)])
    )
    metrics = metrics_from_logits(data.kind, logits, data.y_val)
    e.info.update(
        kind="onnx",
        neurons=None,
        nnz=sum(int(m.sum()) for m in mats.values()),
        params=sum(a.size for a in arrays),
        bytes=model_bytes(mats, vectors),
        metrics=metrics,
        ort_layout="as given",
    )
    e.runners["ort"] = run
    return e


def _load_onnx(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:
        raise FpewidenError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None


def preflight(paths: list[Path]) -> None:
    """Every model checked from its headers before any data is loaded or embedded: no minutes of work that end
    in a refusal."""
    from fpewiden.io.checkpoint import open_checkpoint

    if not paths:
        raise FpewidenError("bench needs at least one model")
    for p in paths:
        if not p.exists():
            raise FpewidenError(f"no such model: {p}")
        if p.suffix == ".onnx":
            _load_onnx(p)
            continue
        ck = open_checkpoint(p)
        if ck.kind == "hf":
            raise FpewidenError(f"{p}: fpewiden bench measures MLP checkpoints and MLP ONNX files")
        find_pairs(ck)


def load_entries(
    paths: list[Path], data: Dataset, engines: list[str], device: torch.device, tmp: Path, threads: int
) -> list[MeasuredModel]:
    entries = []
    for p in paths:
        if not p.exists():
            raise FpewidenError(f"no such model: {p}")
        before = rss_mb()
        e = (
            _from_onnx(p, data, engines, threads)
            if p.suffix == ".onnx"
            else _from_checkpoint(p, data, engines, device, tmp, threads)
        )
        e.info["memory_mb"] = max(0.0, rss_mb() - before)
        entries.append(e)
    return entries


def time_entries(
    entries: list[MeasuredModel], data: Dataset, batch_sizes: list[int], repeat: int, warmup: int, rounds: int = 5
) -> None:
    """Median and p90 latency per engine and batch size over exactly `repeat` timed runs each, spread over
    `rounds` round-robin passes through the models (so slow drifts of the machine hit every model alike)."""
    rounds = max(1, min(rounds, repeat))
    per_round = [repeat // rounds + (1 if r < repeat % rounds else 0) for r in range(rounds)]
    for b in batch_sizes:
        x = data.x_val[:b].numpy()
        if len(x) < b:
            x = np.resize(x, (b, x.shape[1]))
        jobs = [(e, eng, run) for e in entries for eng, run in e.runners.items()]
        times: dict[tuple[int, str], list[float]] = {(id(e), eng): [] for e, eng, _ in jobs}
        for _, _, run in jobs:
            for _ in range(warmup):
                run(x)
        for n in per_round:
            for e, eng, run in jobs:
                for _ in range(n):
                    t = time.perf_counter()
                    run(x)
                    times[(id(e), eng)].append(time.perf_counter() - t)
        for e, eng, _ in jobs:
            ts = sorted(times[(id(e), eng)])
            med = statistics.median(ts)
            e.info.setdefault("latency", {}).setdefault(eng, {})[str(b)] = {
                "median_ms": med * 1e3,
                "p90_ms": ts[int(0.9 * (len(ts) - 1))] * 1e3,
                "items_per_sec": b / med,
                "runs": len(ts),
                "sparse_path": eng == "torch-2:4",
            }


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


def bench(
    paths: list[Path],
    data: Dataset,
    batch_sizes: list[int],
    engines: list[str],
    device: torch.device,
    repeat: int,
    warmup: int,
    threads: int,
) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        entries = load_entries(paths, data, engines, device, Path(d), threads)
        time_entries(entries, data, batch_sizes, repeat, warmup)
    return summarise(entries, threads)
