"""`fpewiden convert`: options → plan → per pair (read, transform, stream into the sink) → close.

Peak memory is one layer pair plus what a chain holds for the next pair, never the checkpoint. All files are
staged and renamed into place only when everything succeeded. The transform is the one place where a method
differs: the paper's FPE by default, a calibrated one when calibration data is given.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from fpewiden import __version__
from fpewiden.arch import PairSpec, find_pairs
from fpewiden.arch.hf import config_activation, set_config_width
from fpewiden.convert.options import ConvertOptions
from fpewiden.convert.plan import Plan, make_plan, select_pairs
from fpewiden.convert.sink import OutputSink
from fpewiden.convert.transform import Converted, FpeTransform, PairTransform
from fpewiden.errors import EmptyLayerError, FpewidenError
from fpewiden.fpe.expand import Pair, count
from fpewiden.io.atomic import atomic_dir, atomic_file
from fpewiden.io.checkpoint import MASKS_FILE, Checkpoint, open_checkpoint
from fpewiden.io.metadata import FpeMetadata
from fpewiden.io.outputs import check_outputs
from fpewiden.io.provenance import Provenance, mark_dir
from fpewiden.io.safetensors_stream import nbytes
from fpewiden.io.write import write_hf_extras


def _check_finite(name: str, t: torch.Tensor) -> torch.Tensor:
    """Two reductions and no temporary: max propagates NaN, and ±Inf shows in max or min."""
    if t.is_floating_point() and t.numel() and not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):
        raise FpewidenError(f"{name} holds NaN or Inf values; fix the checkpoint before converting")
    return t


class SourceHash:
    """sha256 over the weight files, computed in a thread while the conversion runs (hashlib releases the GIL);
    stopped, not left running, when the conversion fails."""

    def __init__(self, ck: Checkpoint):
        self._stop = threading.Event()
        self._value: str | None = None
        self._thread = threading.Thread(target=self._run, args=(ck,), daemon=True)

    def _run(self, ck: Checkpoint) -> None:
        self._value = ck.sha256(self._stop)

    def __enter__(self) -> SourceHash:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self) -> str:
        self._thread.join()
        assert self._value is not None
        return self._value


class _Reader:
    """A pair's tensors as the transform needs them: neuron-major, finite, with masks; a matrix an earlier pair
    already converted comes from the sink. Counts each matrix's non-zeros as first read."""

    def __init__(self, ck: Checkpoint, sink: OutputSink):
        self.ck, self.sink = ck, sink
        self.nnz_read: dict[str, int] = {}

    def _matrix(self, name: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        held = self.sink.take(name)
        if held is not None:
            return (*held, self.sink.nnz_held[name])
        t = _check_finite(name, self.ck.get(name))
        m = self.ck.support(name, t)
        self.nnz_read[name] = count(m)
        return t, m, self.nnz_read[name]

    def pair(self, spec: PairSpec) -> tuple[Pair, int]:
        """The pair, and its non-zeros now (each matrix counted once, as it was read or held)."""

        def nm(t: torch.Tensor) -> torch.Tensor:
            return t.T if spec.transposed else t

        ins = [self._matrix(w) for w in spec.in_weights]
        w_out, m_out, n_out = self._matrix(spec.out_weight)
        biases = [_check_finite(b, self.sink.bias(b)) if b else None for b in spec.in_biases]
        pair = Pair([nm(w) for w, _, _ in ins], [nm(m) for _, m, _ in ins], biases, nm(w_out), nm(m_out))
        return pair, sum(n for _, _, n in ins) + n_out


def _layers(plan: Plan, ck: Checkpoint, reader: _Reader, sink: OutputSink, shorts: list[int]) -> list[dict]:
    """Per pair, counted on the matrices as read and as finally written: the numbers `inspect` shows. In a chain
    a hidden layer's outgoing matrix is the next one's incoming matrix and is counted in both rows."""
    return [
        {
            "name": p.name,
            "neurons_before": plan.neurons(p, ck.shapes),
            "neurons_after": plan.neurons(p, plan.shapes),
            "nnz_in_before": sum(reader.nnz_read[w] for w in p.in_weights),
            "nnz_in_after": sum(sink.nnz_written.get(w, 0) for w in p.in_weights),
            "nnz_out_before": reader.nnz_read[p.out_weight],
            "nnz_out_after": sink.nnz_written.get(p.out_weight, 0),
            "short_neurons": short,
        }
        for p, short in zip(plan.chosen, shorts, strict=True)
    ]


def _stream(
    ck: Checkpoint,
    plan: Plan,
    opts: ConvertOptions,
    transform: PairTransform,
    meta: FpeMetadata,
    sink: OutputSink,
    on_pair: Callable[[str, int, int], None] | None,
    provenance: Provenance,
) -> dict:
    """Convert every chosen pair into the sink, then close it with the final metadata; returns the report. On any
    failure the sink's partial files are dropped."""
    try:
        return _stream_pairs(ck, plan, opts, transform, meta, sink, on_pair, provenance)
    except BaseException:
        sink.abort()
        raise


def pair_bytes(ck: Checkpoint, spec: PairSpec) -> int:
    """The bytes of a pair's matrices as stored: what convert reads for it, the unit of its progress."""
    return sum(nbytes(ck.dtypes[n], ck.shapes[n]) for n in (*spec.in_weights, spec.out_weight))


def _emit(
    sink: OutputSink, k: int, names: tuple[str, ...], rows: list[int], transposed: bool, result: Converted
) -> list[int]:
    """Stream a converted pair's row blocks into the sink; returns the non-zeros kept per matrix. A function of
    its own so that no loop variable keeps the last block alive through the next pair's conversion."""
    kept = [0] * len(names)
    for i, row, w, m in result.blocks:
        sink.emit(k, names[i], row, w, m, rows[i], transposed)
        kept[i] += count(m)
    return kept


def _stream_pairs(ck, plan, opts, transform, meta, sink, on_pair, provenance) -> dict:
    reader = _Reader(ck, sink)
    done, total = 0, sum(pair_bytes(ck, p) for p in plan.chosen)
    shorts: list[int] = []
    with SourceHash(ck) as source:
        for k, spec in enumerate(plan.chosen):
            pair, nnz_now = reader.pair(spec)
            budget = plan.pair_budget(k, opts.budget, nnz_now)
            names = (*spec.in_weights, spec.out_weight)
            rows = [plan.neurons(spec, plan.shapes)] * len(spec.in_weights) + [pair.w_out.shape[0]]
            b_out = reader.sink.bias(spec.out_bias) if spec.out_bias else None
            had = [count(m) for m in (*pair.m_in, pair.m_out)]  # the pair is the transform's from here
            try:
                result = transform(k, spec, pair, budget, b_out)
                kept = _emit(sink, k, names, rows, spec.transposed, result)
            except FpewidenError as e:
                raise FpewidenError(f"layer {spec.name}: {e}") from None
            for name, n_kept, n_had in zip(names, kept, had, strict=True):
                if n_kept == 0 and n_had > 0:
                    raise EmptyLayerError(
                        f"--budget {opts.budget} leaves layer {spec.name} with no weights in {name}; choose a larger "
                        "--budget"
                    )
            for name, scales in zip(names, result.scales or [], strict=False):
                if scales is not None:
                    sink.set_scales(name, scales)
            for b, tensor in zip(spec.in_biases, result.in_biases, strict=True):
                if b and tensor is not None:
                    sink.set_bias(b, tensor)
            if spec.out_bias and result.out_bias is not None:
                sink.set_bias(spec.out_bias, result.out_bias)
            shorts.append(result.short_neurons)
            del pair, result
            done += pair_bytes(ck, spec)
            if on_pair:
                on_pair(spec.name, done, total)
        meta.source_sha256 = source.result()
        provenance.known(meta.source_sha256)
    meta.written_by = provenance.record()
    summary = getattr(transform, "summary", None)
    if summary is not None:
        meta.calibration = summary()
    meta.budget = sum(sink.nnz_written.values())
    meta.nnz_before = sum(reader.nnz_read.values())
    meta.layers = _layers(plan, ck, reader, sink, shorts)
    meta.pairs = [
        {
            "name": p.name,
            "in": list(p.in_weights),
            "in_bias": list(p.in_biases),
            "out": p.out_weight,
            "transposed": p.transposed,
        }
        for p in plan.chosen
    ]
    if ck.kind == "mlp":
        first = ck.shapes[plan.pairs[0].in_weights[0]]
        meta.widths = [
            first[1],
            *[plan.neurons(p, plan.shapes) for p in plan.pairs],
            plan.shapes[plan.pairs[-1].out_weight][0],
        ]
    sink.close({"format": "pt", **meta.strings()})
    warnings = list(getattr(transform, "warnings", []))
    return {"layers": meta.layers, "nnz_before": meta.nnz_before, "nnz_after": meta.budget, "warnings": warnings}


def convert(
    src: Path,
    dst: Path,
    opts: ConvertOptions,
    on_pair: Callable[[str, int, int], None] | None = None,
    force: bool = False,
    clauses_path: Path | None = None,
    transform: PairTransform | None = None,
    packed: bool = False,
) -> dict:
    """Convert `src` into `dst`; returns a report (per layer neurons and non-zeros, totals, metadata).
    `on_pair(name, bytes done, bytes in all)` is called after each pair. `packed`: write the packed checkpoint
    (fpewiden/packed/pack.py) instead of the dense one."""
    if packed:
        return _convert_packed(src, dst, opts, on_pair, force, clauses_path, transform)
    opts.validate()
    ck = open_checkpoint(src)
    calib = [Path(opts.calibration.data)] if opts.calibration and Path(opts.calibration.data).is_file() else []
    provenance = Provenance("convert", ck.sha256)
    check_outputs([dst], [src, *([clauses_path] if clauses_path else []), *calib], force, provenance=provenance)
    if ck.kind == "mlp" and dst.suffix != ".safetensors":
        raise FpewidenError(f"--out {dst}: MLP checkpoints are written as .safetensors; name the output *.safetensors")
    pairs = find_pairs(ck)
    chosen = select_pairs(pairs, opts.targets, ck.kind == "hf")
    plan = make_plan(ck.shapes, ck.dtypes, pairs, chosen, opts.alpha, opts.clauses, opts.expand_fraction)
    tied = {p.out_weight: opts.alpha for p in chosen} if opts.outgoing == "tied" and opts.alpha > 1 else {}
    inputs = {w for p in chosen for w in p.in_weights}
    for p in chosen:
        if p.out_weight in tied and p.out_weight in inputs:
            raise FpewidenError(
                f"--outgoing tied: layer {p.name}'s outgoing matrix {p.out_weight} is the next layer's incoming "
                "matrix; tie only the last hidden layer of a chain (--targets) or a single hidden layer"
            )
    if opts.budget.kind not in ("same", "all"):
        owned = {n for group in plan.owned() for n in group}
        plan.set_budget(opts.budget, {n: count(ck.support(n)) for n in owned})
    activation = config_activation(ck.config or {}, chosen[0]) if ck.kind == "hf" else opts.activation
    meta = FpeMetadata(
        version=__version__,
        kind=ck.kind,
        activation=activation,
        alpha=opts.alpha,
        split=opts.split,
        outgoing=opts.outgoing,
        overlap=opts.overlap,
        seed=opts.seed,
        budget_spec=str(opts.budget),
        source=str(src),
    )
    scales = quantized_shapes(plan, opts)
    if transform is None and opts.calibration is not None:
        from fpewiden.convert.calibration import CalibratedTransform

        transform = CalibratedTransform(ck, opts, chosen, dst.parent, plan.last_use)  # dst.parent: by check_outputs
    transform = transform or FpeTransform(opts)
    base = {"format": "pt", **meta.strings()}
    if ck.kind == "mlp":
        with atomic_file(dst) as tmp:
            sink = OutputSink(ck, plan, {ck.file_of[n]: tmp for n in ck.shapes}, None, base, tied, scales)
            report = _stream(ck, plan, opts, transform, meta, sink, on_pair, provenance)
    else:
        with atomic_dir(dst) as tmp:
            sink = OutputSink(
                ck, plan, {f: tmp / f for f in set(ck.file_of.values())}, tmp / MASKS_FILE, base, tied, scales
            )
            report = _stream(ck, plan, opts, transform, meta, sink, on_pair, provenance)
            config = json.loads(json.dumps(ck.config))
            for p in chosen:
                if p.config_key:
                    set_config_width(config, p.config_key, plan.neurons(p, plan.shapes))
            write_hf_extras(ck, tmp, config)
            mark_dir(tmp, provenance)
    return {"src": str(src), "dst": str(dst), **report, "metadata": meta.public()}


def quantized_shapes(plan: Plan, opts: ConvertOptions) -> dict[str, tuple[int, int]]:
    """With --quantize: every converted matrix's scales, (output rows, groups) in its Linear orientation."""
    if opts.quantize is None:
        return {}
    grid = opts.quantize.grid()
    out = {}
    for p in plan.chosen:
        for n in (*p.in_weights, p.out_weight):
            rows, cols = plan.shapes[n][::-1] if p.transposed else plan.shapes[n]
            out[n] = (rows, grid.groups(cols))
    return out


def _convert_packed(src, dst, opts, on_pair, force, clauses_path, transform) -> dict:
    """Convert into a stage beside `dst`, then pack the stage into `dst`: the dense α× output exists only for as
    long as packing it takes (bench/results/convert_speed measures what that costs)."""
    import tempfile

    from fpewiden.packed.pack import pack_checkpoint

    opts.validate()
    calib = [Path(opts.calibration.data)] if opts.calibration and Path(opts.calibration.data).is_file() else []
    inputs = [src, *([clauses_path] if clauses_path else []), *calib]
    provenance = Provenance("convert", lambda: open_checkpoint(src).sha256())
    check_outputs([dst], inputs, force, provenance=provenance)
    suffix = ".safetensors" if dst.suffix == ".safetensors" else ""
    with tempfile.TemporaryDirectory(prefix=f".{dst.name}.dense.", dir=dst.parent) as stage:
        dense = Path(stage) / f"converted{suffix}"
        report = convert(src, dense, opts, on_pair, False, clauses_path, transform)
        provenance.known(report["metadata"]["source_sha256"])
        q = opts.quantize
        packing = pack_checkpoint(dense, dst, q.bits if q else None, force=True, provenance=provenance,
                                  inputs=[*inputs, dense], group_size=q.group_size if q else None)  # fmt: skip
    return {**report, "dst": str(dst), "packed": packing}
