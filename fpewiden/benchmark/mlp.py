"""`fpewiden bench` on MLPs: checkpoints (torch, and their ONNX export for ort) and MLP ONNX files, scored on a
DATA spec's held-out split."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fpewiden.arch import find_pairs
from fpewiden.benchmark.competitors import (
    adopt_reference,
    quantized_export,
    reference_engines,
    split_engines,
    torch_int8_entry,
)
from fpewiden.benchmark.competitors import label as competitor_label
from fpewiden.benchmark.formats import model_bytes, packed_weight_bytes, pair_layouts
from fpewiden.benchmark.measure import (
    MeasuredModel,
    Workload,
    model_labels,
    ort_session,
    packed_onnx,
    refuse_packed_onnx,
    rss_mb,
    summarise,
    time_entries,
)
from fpewiden.data.labels import evaluate, metrics_from_logits
from fpewiden.data.specs import Dataset
from fpewiden.errors import FpewidenError
from fpewiden.packed.pack import widened_alphas
from fpewiden.packed.reader import is_packed


def _check_width(entry: MeasuredModel, n_in: int, data: Dataset, n_out: int | None = None) -> None:
    if n_in != data.n_inputs:
        raise FpewidenError(f"{entry.path} reads {n_in} input features but {data.spec} has {data.n_inputs}")
    # a classifier may have more outputs than the split shows classes; other targets must match exactly
    if n_out is not None and (n_out < data.n_outputs if data.kind == "classes" else n_out != data.n_outputs):
        raise FpewidenError(f"{entry.path} has {n_out} outputs but {data.spec} has {data.n_outputs} targets")


def _ort_runner(path: Path, threads: int, device: torch.device | None = None):
    sess = ort_session(path, threads, device)
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
    e = MeasuredModel(path)
    _check_width(e, tr.n_inputs, data, tr.n_outputs)
    tensors = tr.tensors()
    weights = {n: t for n, t in tensors.items() if t.dim() == 2}
    masks = {n: tr.masks.get(n, t != 0) for n, t in weights.items()}
    meta = tr.ck.meta
    pairs = find_pairs(tr.ck)
    alphas = widened_alphas(tr.ck)
    packed = packed_weight_bytes(masks, alphas)  # counted on the stored (uncollapsed) matrices, as pack stores them
    layouts, masks = pair_layouts(tr, masks)
    fast = bool(layouts) and all(p.structure is not None for p in layouts)
    vectors = sum(t.numel() for t in tensors.values() if t.dim() == 1)
    e.info.update(
        kind="checkpoint",
        neurons=sum(tensors[p.in_weights[0]].shape[0] for p in pairs),
        nnz=sum(int(torch.count_nonzero(m)) for m in masks.values()),
        params=sum(t.numel() for t in tensors.values()),
        bytes=model_bytes(masks, vectors, layouts, packed),
        fpewiden={k: getattr(meta, k) for k in ("alpha", "split", "outgoing", "budget_spec") if getattr(meta, k)},
    )
    if "ort" in engines:  # exported from the model already loaded, before it moves to the device
        layout = "fast" if fast else "dense"
        onnx_path = tmp / f"{len(list(tmp.iterdir()))}.onnx"
        export(path, onnx_path, layout, verify=False, model=tr)
        e.info["ort_layout"] = layout
        e.exported = onnx_path if layout == "dense" else None
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
    if "packed" in engines or "ort-packed" in engines:
        _add_packed(e, tr, alphas, engines, tmp, threads)
    return e


def _add_packed(e: MeasuredModel, tr, alphas: dict[str, int], engines: list[str], tmp: Path, threads: int) -> None:
    """fpewiden's packed kernels on the same weights (CPU): every matrix in the format `fpewiden pack` picks."""
    from fpewiden.packed import kernels
    from fpewiden.packed.swap import packed_chain

    model = tr.model
    names = list(model.named_weights())
    biases = iter(model.biases)
    layers = [
        (w.detach(), next(biases).detach() if has else None, alphas.get(n))
        for n, w, has in zip(names, model.weights, model.has_bias, strict=True)
    ]
    chain, _ = packed_chain(layers, tr.activation)
    e.info["packed_kernel"] = kernels.path()

    def run(x: np.ndarray, chain=chain) -> np.ndarray:
        with torch.inference_mode():
            return chain(torch.from_numpy(x)).numpy()

    if "packed" in engines:
        e.runners["packed"] = run
    if "ort-packed" in engines:
        e.runners["ort-packed"] = _ort_runner(packed_onnx(chain, "mlp", 0, tmp), threads)


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
    from fpewiden.benchmark.onnx_weights import (
        initializer_arrays,
        quantized,
        quantized_bytes,
        stored_nonzeros,
    )

    e = MeasuredModel(path)
    if "ort" not in engines:
        raise FpewidenError(f"{path} is an ONNX file: measure it with --engines ort")
    model = _load_onnx(path)
    refuse_packed_onnx(path, model)
    named = initializer_arrays(model)
    arrays = list(named.values())
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
    if quantized(named):  # integer weights: what the file stores, exactly (the float masks miss them)
        e.info.update(nnz=stored_nonzeros(named), bytes=quantized_bytes(named), ort_layout="quantized, as given")
    e.runners["ort"] = run
    return e


def _load_onnx(path: Path):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:
        raise FpewidenError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None


def load_entries(
    paths: list[Path],
    data: Dataset,
    engines: list[str],
    device: torch.device,
    tmp: Path,
    threads: int,
    say: Callable[[str], None] = lambda _m: None,
) -> list[MeasuredModel]:
    plain, competitors = split_engines(engines)
    entries = []
    labels = model_labels(paths)
    for i, (p, label) in enumerate(zip(paths, labels, strict=True)):
        if not p.exists():
            raise FpewidenError(f"no such model: {p}")
        mine = reference_engines(plain, competitors) if i == 0 else plain
        say(f"loading and scoring {label} ({i + 1}/{len(paths)}; {', '.join(mine)})")
        before = rss_mb()
        if p.suffix == ".onnx":
            e = _from_onnx(p, data, mine, threads)
        elif is_packed(p):
            e = _from_packed(p, data, mine)
        else:
            e = _from_checkpoint(p, data, mine, device, tmp, threads)
        e.info["memory_mb"] = max(0.0, rss_mb() - before)
        entries.append(e)
    for c in competitors:
        say(f"building and scoring {competitor_label(labels[0], c)}")
        before = rss_mb()
        e = _competitor(entries[0], c, data, device, tmp, threads)
        e.label = competitor_label(labels[0], c)
        e.info["memory_mb"] = max(0.0, rss_mb() - before)
        entries.append(e)
    return entries


def _from_packed(path: Path, data: Dataset, engines: list[str]) -> MeasuredModel:
    """A packed MLP file (`fpewiden pack`) on fpewiden's kernels, at the bytes it stores."""
    from fpewiden.benchmark.packed_files import packed_model

    info, model, kind = packed_model(path, engines)
    if kind != "mlp":
        raise FpewidenError(f"{path}: fpewiden bench measures MLP checkpoints and MLP ONNX files")
    e = MeasuredModel(path)
    first = next(m for m in model.modules() if hasattr(m, "in_features"))
    _check_width(e, first.in_features, data, None)
    e.info.update(info, metrics=metrics_from_logits(data.kind, _logits(model, data.x_val), data.y_val))

    def run(x: np.ndarray, model=model) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    e.runners["packed"] = run
    return e


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(x.cpu())


def _competitor(ref: MeasuredModel, competitor: str, data: Dataset, device, tmp: Path, threads: int):
    """A quantized competitor of the reference (benchmark/competitors.py), scored on the same data."""
    from fpewiden.model.loaded import load_model

    if competitor != "torch-int8":
        e = _from_onnx(quantized_export(ref, competitor, tmp), data, ["ort"], threads)
        adopt_reference(e, ref, competitor)
        return e
    e, q = torch_int8_entry(ref, device, lambda: load_model(ref.path).model)
    e.info["metrics"] = metrics_from_logits(data.kind, _logits(q, data.x_val), data.y_val)

    def run(x: np.ndarray, model=q) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    e.runners["torch"] = run
    return e


def workloads(data: Dataset, batch_sizes: list[int]) -> list[Workload]:
    out = []
    for b in batch_sizes:
        x = data.x_val[:b].numpy()
        if len(x) < b:
            x = np.resize(x, (b, x.shape[1]))
        out.append(Workload(str(b), b, x))
    return out


def bench(
    paths: list[Path],
    data: Dataset,
    batch_sizes: list[int],
    engines: list[str],
    device: torch.device,
    repeat: int,
    warmup: int,
    threads: int,
    say: Callable[[str], None] = lambda _m: None,
) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        entries = load_entries(paths, data, engines, device, Path(d), threads, say)
        time_entries(entries, workloads(data, batch_sizes), repeat, warmup, say)
    for e in entries:  # every metric is a share of (or a mean over) the held-out rows: their count bounds it
        e.info["metric_samples"] = {m: len(data.x_val) for m in e.info["metrics"]}
    return summarise(entries, threads)
