"""`fpewiden inspect`: per expandable layer, its width, non-zeros and interference, plus FPE metadata."""

from __future__ import annotations

import math
from pathlib import Path

from fpewiden.arch import find_pairs
from fpewiden.fpe.expand import count
from fpewiden.interference import feature_capacity, mean_abs_cosine
from fpewiden.io.checkpoint import open_checkpoint
from fpewiden.io.metadata import FpeMetadata
from fpewiden.io.safetensors_stream import DTYPES
from fpewiden.packed.reader import is_packed, read_packed


def describe(meta: FpeMetadata, has_zeros: bool) -> str:
    """What a checkpoint is, in a line: pruned or widened and how, calibrated or not, fine-tuned or distilled,
    from which source."""
    if not meta.converted:
        what = "a checkpoint fpewiden did not convert"
        what += ", pruned (it holds exact zeros)" if has_zeros else ", dense"
    elif meta.alpha == 1:
        what = (
            f"pruned (α=1) to budget {meta.budget_spec} of {meta.nnz_before:,} non-zeros"
            if meta.nnz_before
            else "pruned"
        )
    else:
        what = f"widened by FPE: α={meta.alpha}, split {meta.split}, outgoing {meta.outgoing or 'copy'}"
        what += f", budget {meta.budget_spec}" if meta.budget_spec else ""
        if meta.overlap:
            what += f", overlap {meta.overlap} (a control, not FPE)"
    if meta.converted:
        cal = meta.calibration
        if cal:
            how = "magnitude" if cal.get("importance") == "magnitude" else "activation saliency"
            refit = ", least-squares refit" if cal.get("reconstruct") else ""
            size = f"{cal['tokens']:,} tokens" if "tokens" in cal else f"{cal.get('samples')} samples"
            what += f"; calibrated on {cal.get('data')} ({size}; {how}{refit})"
            q = cal.get("quantization")
            if q:
                what += f"; quantized to {q.get('bits')} by {q.get('method')} (scales {q.get('scales')})"
        else:
            what += "; by magnitude, not calibrated"
        if meta.source:
            what += f"; from {meta.source}"
    if meta.train_data:
        verb = "distilled" if meta.train_data.startswith("distill ") else "fine-tuned"
        data = meta.train_data.removeprefix("distill ")
        what += f"; then {verb} for {meta.train_epochs} epoch(s) on {data}"
    return what


def inspect_packed(path: Path) -> dict:
    """A packed checkpoint: what it is, and per Linear weight its format and the bytes it moves per inference."""
    from fpewiden.io.safetensors_stream import DTYPES
    from fpewiden.packed.format import dense_bytes

    pc = read_packed(path)
    rows = []
    for name, e in pc.entries.items():
        arrays = e.arrays(name)
        stored = sum(pc.headers[t].entries[t].end - pc.headers[t].entries[t].start for r, t in arrays.items()
                     if r != "negzero")  # fmt: skip
        pad = 16 * DTYPES[e.dtype].itemsize  # format.PAD values, never read as weights
        rows.append({"name": name, "format": e.format, "shape": [e.rows, e.cols], "dtype": e.dtype, "nnz": e.nnz,
                     "dense_bytes": dense_bytes(e.rows, e.cols, DTYPES[e.source_dtype]),
                     "packed_bytes": stored - pad})  # fmt: skip
    d, p = sum(r["dense_bytes"] for r in rows), sum(r["packed_bytes"] for r in rows)
    what = "packed: " + describe(pc.meta, True)
    return {"path": str(path), "dst": str(path), "kind": pc.kind, "what": what, "matrices": rows,
            "dense_bytes": d, "packed_bytes": p, "fpewiden": {k: v for k, v in pc.meta.public().items()
                                                                if k not in {"layers", "pairs"}}}  # fmt: skip


EMBEDDING_NAMES = ("embed", "wte", "wpe", "shared.weight")  # token and position tables across families


def byte_shares(ck, pairs) -> dict[str, float]:
    """Which share of a checkpoint's tensor bytes the conversion can touch (the expandable pairs' matrices), which
    the embedding tables hold, and the rest (attention, norms, biases), from the headers alone: what bounds how much
    smaller `convert` can make the file. Masks are not counted."""
    size = {n: math.prod(shape) * DTYPES[ck.dtypes[n]].itemsize for n, shape in ck.shapes.items()}
    total = sum(size.values()) or 1
    pair = {n for p in pairs for n in (*p.in_weights, p.out_weight)}
    embed = {n for n in size if n not in pair and len(ck.shapes[n]) == 2 and any(k in n for k in EMBEDDING_NAMES)}
    shares = {"pairs": sum(size[n] for n in pair) / total, "embeddings": sum(size[n] for n in embed) / total}
    return shares | {"rest": max(0.0, 1.0 - shares["pairs"] - shares["embeddings"])}


def shares_line(shares: dict[str, float]) -> str:
    """`byte_shares` as people read it."""
    line = f"the pairs convert changes hold {shares['pairs']:.0%} of this checkpoint's weight bytes"
    if shares["embeddings"] >= 0.005:
        line += f", embeddings {shares['embeddings']:.0%}"
    return line + f", everything else {shares['rest']:.0%}"


NOTE_BELOW = 0.6  # convert says so, before converting, when the pairs hold less than this share of the bytes


def convert_note(src: Path) -> str | None:
    """One line for `convert` to print before a long conversion of a model whose bytes are mostly what it never
    changes (MiniLM: the FFN pairs 31%, the embedding table half), else None."""
    from fpewiden.arch import find_pairs
    from fpewiden.io.checkpoint import open_checkpoint

    ck = open_checkpoint(src)
    shares = byte_shares(ck, find_pairs(ck))
    if shares["pairs"] >= NOTE_BELOW:
        return None
    return (
        f"{shares_line(shares)}: the file shrinks far less than --budget suggests (fpewiden pack --dtype int8 "
        "stores every matrix and table at a quarter)"
    )


def inspect_checkpoint(path: Path) -> dict:
    """A JSON-ready report. Per layer: the incoming matrices' non-zeros (gate and up together for gated MLPs)
    and the outgoing matrix's, as `convert` reports them; density over both. Totals count each matrix once (in a
    chain a hidden layer's outgoing matrix is the next one's incoming). Interference metrics are measured on the
    first incoming matrix (gated MLPs: the gate projection; both read the same inputs)."""
    if is_packed(path):
        return inspect_packed(path)
    ck = open_checkpoint(path)
    meta = ck.meta
    before = {r["name"]: r["neurons_before"] for r in meta.layers or []}
    tied = meta.tied()  # stored as equal copies per parent, counted once
    layers = []
    seen: dict[str, tuple[int, int]] = {}  # matrix -> (non-zeros, entries)
    pairs = find_pairs(ck)
    for p in pairs:
        w_in = None
        for name in (*p.in_weights, p.out_weight):
            if name not in seen or name == p.in_weights[0]:
                t = ck.get(name)
                m = ck.support(name, t)
                seen[name] = (count(m) // tied.get(name, 1), t.numel() // tied.get(name, 1))
                if name == p.in_weights[0]:  # read once: its masked values feed the interference metrics
                    w_in = t.float() * m
        assert w_in is not None
        w_in = w_in.T if p.transposed else w_in
        cosine, sampled = mean_abs_cosine(w_in)
        nnz_in = sum(seen[n][0] for n in p.in_weights)
        nnz_out = seen[p.out_weight][0]
        numel = sum(seen[n][1] for n in (*p.in_weights, p.out_weight))
        layers.append(
            {
                "name": p.name,
                "in_shape": list(w_in.shape),
                "out_shape": list(ck.shapes[p.out_weight]),
                "neurons_before": before.get(p.name, w_in.shape[0]),
                "neurons": w_in.shape[0],
                "nnz_in": nnz_in,
                "nnz_out": nnz_out,
                "params": numel,
                "density": (nnz_in + nnz_out) / numel if numel else 0.0,
                "feature_capacity": feature_capacity(w_in),
                "mean_abs_cosine": cosine,
                "cosine_sampled": sampled,
            }
        )
    nnz_total = sum(v[0] for v in seen.values())
    params_total = sum(v[1] for v in seen.values())
    return {
        "path": str(path),
        "kind": ck.kind,
        "what": describe(meta, nnz_total < params_total),
        "fpewiden": {k: v for k, v in meta.public().items() if k not in {"layers", "pairs"}},
        "layers": layers,
        "byte_shares": byte_shares(ck, pairs),
        "totals": {
            "neurons": sum(r["neurons"] for r in layers),
            "nnz": nnz_total,
            "params": params_total,
            "density": nnz_total / params_total if params_total else 0.0,
        },
    }
