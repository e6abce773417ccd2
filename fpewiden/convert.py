"""`fpewiden convert`: stream a checkpoint pair by pair through FPE and write a widened copy.

Every output shape is known before any value is computed, so each output file's header is written first and
tensors are filled in as their pairs finish; untouched tensors are copied byte for byte. Peak memory is one
layer pair. All files go to a temporary path and are renamed into place only when everything succeeded.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fpewiden import __version__
from fpewiden.arch import PairSpec, find_pairs
from fpewiden.arch.hf import config_activation, set_config_width
from fpewiden.errors import FpewidenError
from fpewiden.fpe.expand import OUTGOING, Pair, count, short_neurons, widen_blocks
from fpewiden.fpe.splits import (
    feature_assignment,
    group_assignment,
    overlap_children,
    random_assignment,
    shared_assignment,
)
from fpewiden.io.atomic import atomic_dir, atomic_file
from fpewiden.io.checkpoint import (
    MASK_PREFIX,
    MASKS_FILE,
    META_PREFIX,
    Checkpoint,
    open_checkpoint,
    pack_mask,
    packed_size,
)
from fpewiden.io.outputs import check_outputs, mark_dir
from fpewiden.io.safetensors_stream import DTYPES, StreamingWriter
from fpewiden.io.write import write_hf_extras

SPLITS = ("random", "clause", "feature", "shared")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclass(frozen=True)
class Budget:
    """`same` (the pre-conversion non-zero count), an absolute count, a fraction of the original count, or `all`
    (no pruning: every expanded weight kept, so copied outgoing weights add non-zeros — for baselines and
    inspection, not FPE)."""

    kind: str
    value: float = 0.0

    @staticmethod
    def parse(text: str) -> Budget:
        t = str(text).strip().lower()
        if t in ("same", "all"):
            return Budget(t)
        try:
            if re.fullmatch(r"\d+", t):
                if int(t) == 0:
                    raise ValueError
                return Budget("count", int(t))
            v = float(t)
        except ValueError:
            v = -1.0
        if not 0.0 < v <= 1.0:
            raise FpewidenError(f"--budget {text!r}: expected 'same', 'all', a non-zero count, or a fraction in (0, 1]")
        return Budget("fraction", v)

    def total(self, original: int) -> int:
        if self.kind == "all":
            raise ValueError("budget 'all' depends on the expansion, not on the original count")
        if self.kind == "same":
            return original
        if self.kind == "count":
            return int(self.value)
        return round(self.value * original)

    def __str__(self) -> str:
        if self.kind in ("same", "all"):
            return self.kind
        return str(int(self.value)) if self.kind == "count" else str(self.value)


@dataclass
class ConvertOptions:
    alpha: int
    split: str = "random"
    clauses: list[list[int]] | None = None
    budget: Budget = field(default_factory=lambda: Budget("same"))
    seed: int = 0
    targets: list[str] = field(default_factory=list)
    activation: str = "relu"
    outgoing: str = "copy"
    overlap: float = 0.0  # the paper's control: share of inputs that also reach a second child (not FPE when > 0)


@dataclass
class LayerReport:
    """One pair, counted on the matrices as read and as written: the numbers `inspect` shows for the output.

    In a chain a hidden layer's outgoing matrix is the next one's incoming matrix; it is counted in both rows
    (totals count each matrix once)."""

    name: str
    neurons_before: int
    neurons_after: int
    nnz_in_before: int
    nnz_in_after: int
    nnz_out_before: int
    nnz_out_after: int
    short_neurons: int = 0  # neurons with fewer non-zero inputs than α: their extra children are empty


def pair_seed(seed: int, name: str) -> int:
    """Each layer's partition depends only on the seed and the layer's name, not on which others are converted."""
    return int(hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()[:15], 16)


def largest_remainder(total: int, weights: list[int]) -> list[int]:
    """Integers proportional to `weights` that sum to `total` exactly."""
    s = sum(weights)
    if s == 0:
        return [0] * len(weights)
    raw = [total * w / s for w in weights]
    base = [int(r // 1) for r in raw]
    rest = total - sum(base)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return base


def load_clauses(path: Path) -> list[list[int]]:
    if not path.is_file():
        raise FpewidenError(f"no such clauses file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FpewidenError(f"{path} is not valid JSON (expected a list of lists of input indices)") from None
    if isinstance(data, dict) and "clauses" in data:
        data = data["clauses"]
    ok = (
        isinstance(data, list)
        and data
        and all(
            isinstance(c, list) and c and all(isinstance(j, int) and not isinstance(j, bool) for j in c) for c in data
        )
    )
    if not ok:
        raise FpewidenError(f"{path}: expected a non-empty JSON list of non-empty lists of input indices")
    return data


def select_pairs(ck: Checkpoint, targets: list[str]) -> tuple[list[PairSpec], list[PairSpec]]:
    pairs = find_pairs(ck)
    if not targets:
        return pairs, pairs
    try:
        pats = [re.compile(t) for t in targets]
    except re.error as e:
        raise FpewidenError(f"--targets: invalid regular expression ({e})") from None
    chosen = [p for p in pairs if any(r.search(p.name) for r in pats)]
    if not chosen:
        names = ", ".join(p.name for p in pairs[:8])
        raise FpewidenError(f"--targets matched no expandable layer; layers are: {names}")
    if ck.kind == "hf":
        for key in {p.config_key for p in pairs}:
            group = [p for p in pairs if p.config_key == key]
            n = sum(p in chosen for p in group)
            if 0 < n < len(group):
                raise FpewidenError(
                    f"--targets selects {n} of the {len(group)} layers sized by config '{key}'; transformers "
                    "models have one width per config field, so select all of them or none"
                )
    return pairs, chosen


def _neuron_major(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.T if transposed else t


def _check_finite(name: str, t: torch.Tensor) -> None:
    """Two reductions and no temporary: max propagates NaN, and ±Inf shows in max or min."""
    if t.is_floating_point() and t.numel() and not (torch.isfinite(t.amax()) and torch.isfinite(t.amin())):
        raise FpewidenError(f"{name} holds NaN or Inf values; fix the checkpoint before converting")


def _finite(name: str, t: torch.Tensor) -> torch.Tensor:
    _check_finite(name, t)
    return t


def _assignment(opts: ConvertOptions, pair: Pair, support: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    if opts.split == "magnitude":  # α=1: expansion is the identity, so pruning to budget is magnitude pruning
        return torch.zeros(support.shape, dtype=torch.int8)
    if opts.split == "random":
        return random_assignment(support, opts.alpha, gen)
    if opts.split == "clause":
        assert opts.clauses is not None
        return group_assignment(support, opts.alpha, opts.clauses, gen)
    if opts.split == "shared":
        return shared_assignment(support, opts.alpha, gen)
    return feature_assignment(_feature_source(pair), support, opts.alpha, gen)


def _feature_source(pair: Pair) -> torch.Tensor:
    """The incoming weights whose Gram matrix defines input clusters; gate and up both count for gated MLPs."""
    if len(pair.w_in) == 1:
        return pair.w_in[0]
    return torch.cat([w.to(torch.float32) for w in pair.w_in], dim=0)


class _Plan:
    """Output shapes, which pair finalises which tensor, and the non-zero reduction each pair owes."""

    def __init__(self, ck: Checkpoint, chosen: list[PairSpec], alpha: int):
        self.shapes = dict(ck.shapes)
        self.last_use: dict[str, int] = {}
        for k, p in enumerate(chosen):
            for w, b in zip(p.in_weights, p.in_biases, strict=True):
                s = self.shapes[w]
                self.shapes[w] = (s[0], s[1] * alpha) if p.transposed else (s[0] * alpha, s[1])
                if b:
                    self.shapes[b] = (self.shapes[b][0] * alpha,)
                self.last_use[w] = k
            s = self.shapes[p.out_weight]
            self.shapes[p.out_weight] = (s[0] * alpha, s[1]) if p.transposed else (s[0], s[1] * alpha)
            self.last_use[p.out_weight] = k

    def owned(self, chosen: list[PairSpec]) -> list[list[str]]:
        """Partition the touched matrices among pairs: a matrix belongs to the pair that reads it as input."""
        ins = {w for p in chosen for w in p.in_weights}
        return [[*p.in_weights, *([p.out_weight] if p.out_weight not in ins else [])] for p in chosen]


def _count_nnz(ck: Checkpoint, names: list[str]) -> dict[str, int]:
    return {n: count(ck.support(n)) for n in names}


def magnitude_prune(src: Path, dst: Path, budget: Budget, seed: int = 0, activation: str = "relu") -> dict:
    """The baseline FPE is compared with at a smaller budget: same neurons, smallest weights of each pair removed.

    It is FPE with α=1: expansion is the identity, and the pair's exact-budget pruning is magnitude pruning.
    """
    return convert(
        src, dst, ConvertOptions(alpha=1, split="magnitude", budget=budget, seed=seed, activation=activation)
    )


def validate_options(opts: ConvertOptions) -> None:
    """Every option on its own, before any file is opened."""
    if opts.split == "magnitude":
        if opts.alpha != 1:
            raise FpewidenError("magnitude pruning keeps the neurons: it needs alpha 1")
    elif opts.alpha < 2:
        raise FpewidenError(f"--alpha must be at least 2 (got {opts.alpha})")
    if opts.split not in (*SPLITS, "magnitude"):
        raise FpewidenError(f"--split {opts.split!r}: choose one of {', '.join(SPLITS)}")
    if opts.split == "clause" and opts.clauses is None:
        raise FpewidenError("--split clause needs --clauses FILE")
    if opts.split != "clause" and opts.clauses is not None:
        raise FpewidenError(f"--clauses is only used by --split clause (got --split {opts.split})")
    if not 0.0 <= opts.overlap <= 1.0:
        raise FpewidenError(f"--overlap {opts.overlap}: a share of inputs between 0 and 1")
    if opts.outgoing not in OUTGOING:
        raise FpewidenError(f"--outgoing {opts.outgoing!r}: choose one of {', '.join(OUTGOING)}")
    if opts.activation not in ACTIVATIONS:
        raise FpewidenError(f"--activation {opts.activation!r}: choose one of {', '.join(ACTIVATIONS)}")


def _check_pairs(ck: Checkpoint, chosen: list[PairSpec], opts: ConvertOptions) -> None:
    """What the checkpoint's headers alone can refute: weight dtypes, α against fan-in, clause indices."""
    for p in chosen:
        for name in (*p.in_weights, p.out_weight):
            if not DTYPES[ck.dtypes[name]].is_floating_point:
                raise FpewidenError(
                    f"layer {p.name}: {name} holds {ck.dtypes[name]} values; FPE needs floating-point weights"
                )
        d = ck.shapes[p.in_weights[0]][0 if p.transposed else 1]
        if opts.alpha > d:
            raise FpewidenError(
                f"--alpha {opts.alpha} exceeds the {d} inputs of layer {p.name}: a child would never get an input"
            )
        if opts.clauses is not None:
            bad = [j for c in opts.clauses for j in c if not 0 <= j < d]
            if bad:
                raise FpewidenError(f"clause index {bad[0]} is out of range for layer {p.name}, which has {d} inputs")


def convert(
    src: Path,
    dst: Path,
    opts: ConvertOptions,
    on_pair: Callable[[str, int, int], None] | None = None,
    force: bool = False,
    clauses_path: Path | None = None,
) -> dict:
    """Convert `src` into `dst`; returns a report (per layer neurons and non-zeros, totals, metadata)."""
    validate_options(opts)
    ck = open_checkpoint(src)
    check_outputs([dst], [src, *([clauses_path] if clauses_path else [])], force)
    if ck.kind == "mlp" and dst.suffix != ".safetensors":
        raise FpewidenError(f"--out {dst}: MLP checkpoints are written as .safetensors; name the output *.safetensors")
    pairs, chosen = select_pairs(ck, opts.targets)
    _check_pairs(ck, chosen, opts)

    plan = _Plan(ck, chosen, opts.alpha)
    owned = plan.owned(chosen)
    if opts.budget.kind in ("same", "all"):
        reductions = [0] * len(chosen)
    else:
        counts = _count_nnz(ck, [n for group in owned for n in group])
        owned_nnz = [sum(counts[n] for n in group) for group in owned]
        total_before = sum(owned_nnz)
        target = opts.budget.total(total_before)
        if target <= 0:
            raise FpewidenError(f"--budget {opts.budget} leaves no weights (the layers hold {total_before} non-zeros)")
        reductions = largest_remainder(total_before - target, owned_nnz)

    touched = {w for p in chosen for w in (*p.in_weights, p.out_weight)}
    mask_names = sorted(touched | set(ck.packed_masks))
    shorts: list[int] = []
    current: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    new_biases: dict[str, torch.Tensor] = {}
    nnz_read: dict[str, int] = {}  # each touched matrix's non-zeros as read, and as finally written
    nnz_written: dict[str, int] = {}

    def reports() -> list[LayerReport]:
        return [
            LayerReport(
                p.name,
                ck.shapes[p.in_weights[0]][1 if p.transposed else 0],
                plan.shapes[p.in_weights[0]][1 if p.transposed else 0],
                sum(nnz_read[w] for w in p.in_weights),
                sum(nnz_written.get(w, 0) for w in p.in_weights),
                nnz_read[p.out_weight],
                nnz_written.get(p.out_weight, 0),
                short,
            )
            for p, short in zip(chosen, shorts, strict=False)
        ]

    def process(k: int, p: PairSpec, emit: Callable[..., None]) -> None:
        """Convert pair k; hand each block of rows (neuron-major) to `emit` as soon as it exists."""

        def load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
            if name in current:
                return current.pop(name)
            t = ck.get(name)
            _check_finite(name, t)
            m = ck.support(name, t)
            nnz_read[name] = count(m)
            return t, m

        loaded = [load(w) for w in p.in_weights]
        w_out, m_out = load(p.out_weight)
        pair = Pair(
            [_neuron_major(w, p.transposed) for w, _ in loaded],
            [_neuron_major(m, p.transposed) for _, m in loaded],
            [_finite(b, ck.get(b)) if b else None for b in p.in_biases],
            _neuron_major(w_out, p.transposed),
            _neuron_major(m_out, p.transposed),
        )
        del loaded, w_out, m_out
        try:
            support = pair.support()  # one (neurons × inputs) mask, shared by the checks and the splits
            short = short_neurons(support, opts.alpha)
            before = pair.nnz()
            gen = torch.Generator().manual_seed(pair_seed(opts.seed, p.name))
            assignment = _assignment(opts, pair, support, gen)
            second = overlap_children(assignment, support, opts.alpha, opts.overlap, gen) if opts.overlap else None
            del support
            names = (*p.in_weights, p.out_weight)
            rows = [w.shape[0] * opts.alpha for w in pair.w_in] + [pair.w_out.shape[0]]
            budget = None if opts.budget.kind == "all" else before - reductions[k]
            if budget is not None and budget < 0:
                raise FpewidenError(
                    f"--budget {opts.budget} is too small: layer {p.name} would have to keep fewer than zero weights "
                    "after the earlier layers' pruning; choose a larger --budget"
                )
            blocks = widen_blocks(pair, opts.alpha, assignment, budget, opts.outgoing, second)
            for i, row, w, m in blocks:
                emit(names[i], row, w, m, rows[i], p.transposed)
        except FpewidenError as e:
            if str(e).startswith("--budget"):
                raise
            raise FpewidenError(f"layer {p.name}: {e}") from None
        for b, parent in zip(p.in_biases, pair.b_in, strict=True):
            if b and parent is not None:
                new_biases[b] = (parent / opts.alpha).repeat_interleave(opts.alpha).to(parent.dtype)
        shorts.append(short)

    activation = opts.activation
    if ck.kind == "hf":
        assert ck.config is not None
        activation = config_activation(ck.config, chosen[0])
    meta_base = {
        "format": "pt",
        f"{META_PREFIX}version": __version__,
        f"{META_PREFIX}alpha": str(opts.alpha),
        f"{META_PREFIX}split": opts.split,
        f"{META_PREFIX}outgoing": opts.outgoing,
        f"{META_PREFIX}overlap": str(opts.overlap),
        f"{META_PREFIX}seed": str(opts.seed),
        f"{META_PREFIX}budget_spec": str(opts.budget),
        f"{META_PREFIX}activation": activation,
        f"{META_PREFIX}kind": ck.kind,
    }

    # hashing the source reads every weight file once more; hashlib releases the GIL, so it overlaps the work
    hasher = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    source_sha = hasher.submit(ck.sha256)
    hasher.shutdown(wait=False)

    def metadata() -> dict[str, str]:
        m = dict(meta_base)
        m[f"{META_PREFIX}source_sha256"] = source_sha.result()
        m[f"{META_PREFIX}budget"] = str(sum(nnz_written.values()))
        m[f"{META_PREFIX}nnz_before"] = str(sum(nnz_read.values()))
        m[f"{META_PREFIX}layers"] = json.dumps([r.__dict__ for r in reports()])
        m[f"{META_PREFIX}pairs"] = json.dumps(
            [
                {
                    "name": p.name,
                    "in": list(p.in_weights),
                    "in_bias": list(p.in_biases),
                    "out": p.out_weight,
                    "transposed": p.transposed,
                }
                for p in chosen
            ]
        )
        if ck.kind == "mlp":
            first = ck.shapes[pairs[0].in_weights[0]]
            widths = [first[1], *[plan.shapes[p.in_weights[0]][0] for p in pairs], plan.shapes[pairs[-1].out_weight][0]]
            m[f"{META_PREFIX}widths"] = json.dumps(widths)
        return m

    by_file: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    for name in ck.shapes:
        by_file.setdefault(ck.file_of[name], {})[name] = (ck.dtypes[name], plan.shapes[name])
    mask_layout = {f"{MASK_PREFIX}{n}": ("U8", (packed_size(plan.shapes[n]),)) for n in mask_names}
    reserve = 4096 + 512 * len(chosen)

    def write_all(weights_path: Callable[[str], Path], masks_path: Path | None) -> None:
        """Fill every output file; masks go inside the single weights file when `masks_path` is None."""
        if masks_path is None:
            (only,) = by_file
            by_file[only].update(mask_layout)
        writers = {f: StreamingWriter(weights_path(f), layout, meta_base, reserve) for f, layout in by_file.items()}
        if masks_path is not None:
            writers[MASKS_FILE] = StreamingWriter(masks_path, mask_layout, meta_base, reserve)
        mask_file = MASKS_FILE if masks_path is not None else next(iter(by_file))
        try:
            written: set[str] = set()
            packed = dict(ck.packed_masks)

            parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

            def finish(name: str, m_packed: torch.Tensor, nnz: int) -> None:
                packed[name] = m_packed
                nnz_written[name] = nnz
                written.add(name)

            def emit(
                k: int, name: str, row: int, w: torch.Tensor, m: torch.Tensor, rows: int, transposed: bool
            ) -> None:
                """Write a block at its offset when it is final and stored neuron-major; else gather the tensor."""
                done = row + w.shape[0] == rows
                if plan.last_use[name] <= k and not transposed:
                    writers[ck.file_of[name]].write(name, w, row_start=row)
                    parts.setdefault(name, []).append((pack_mask(m), torch.tensor(count(m))))
                    if done:
                        blocks = parts.pop(name)
                        finish(name, torch.cat([b for b, _ in blocks]), int(sum(n for _, n in blocks)))
                    return
                parts.setdefault(name, []).append((w, m))
                if not done:
                    return
                blocks = parts.pop(name)
                w_all = _neuron_major(torch.cat([b for b, _ in blocks]), transposed).contiguous()
                m_all = _neuron_major(torch.cat([b for _, b in blocks]), transposed).contiguous()
                if plan.last_use[name] > k:  # a later pair reads it (MLP chains): keep it in memory until then
                    current[name] = (w_all, m_all)
                else:
                    writers[ck.file_of[name]].write(name, w_all)
                    finish(name, pack_mask(m_all), count(m_all))

            for k, p in enumerate(chosen):
                process(k, p, functools.partial(emit, k))
                if on_pair:
                    on_pair(p.name, k + 1, len(chosen))
            for name, b in new_biases.items():
                writers[ck.file_of[name]].write(name, b)
                written.add(name)
            for name in ck.shapes:
                if name in written:
                    continue
                if name in ck.headers:
                    writers[ck.file_of[name]].copy_raw(name, ck.headers[name], name)
                else:
                    writers[ck.file_of[name]].write(name, ck.get(name))
            for n in mask_names:
                writers[mask_file].write(f"{MASK_PREFIX}{n}", packed[n])
            final = metadata()
            for w in writers.values():
                w.set_metadata(final)
                w.close()
        except BaseException:
            for w in writers.values():
                if not w.file.closed:
                    w.abort()
            raise

    if ck.kind == "mlp":
        with atomic_file(dst) as tmp:
            write_all(lambda f: tmp, None)
    else:
        with atomic_dir(dst) as tmp:
            write_all(lambda f: tmp / f, tmp / MASKS_FILE)
            mark_dir(tmp, "convert")
            config = json.loads(json.dumps(ck.config))
            for p in chosen:
                if p.config_key:
                    s = plan.shapes[p.in_weights[0]]
                    set_config_width(config, p.config_key, s[1] if p.transposed else s[0])
            write_hf_extras(ck, tmp, config)
    return {
        "src": str(src),
        "dst": str(dst),
        "layers": [r.__dict__ for r in reports()],
        "nnz_before": sum(nnz_read.values()),
        "nnz_after": sum(nnz_written.values()),
        "metadata": {k[len(META_PREFIX) :]: v for k, v in metadata().items() if k.startswith(META_PREFIX)},
    }
