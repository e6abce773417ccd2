"""`fpewiden inspect`: per expandable layer, its width, non-zeros and interference, plus FPE metadata."""

from __future__ import annotations

from pathlib import Path

from fpewiden.arch import find_pairs
from fpewiden.fpe.expand import count
from fpewiden.interference import feature_capacity, mean_abs_cosine
from fpewiden.io.checkpoint import open_checkpoint


def inspect_checkpoint(path: Path) -> dict:
    """A JSON-ready report. Per layer: the incoming matrices' non-zeros (gate and up together for gated MLPs)
    and the outgoing matrix's, as `convert` reports them; density over both. Totals count each matrix once (in a
    chain a hidden layer's outgoing matrix is the next one's incoming). Interference metrics are measured on the
    first incoming matrix (gated MLPs: the gate projection; both read the same inputs)."""
    ck = open_checkpoint(path)
    meta = ck.meta
    before = {r["name"]: r["neurons_before"] for r in meta.layers or []}
    tied = meta.tied()  # stored as equal copies per parent, counted once
    layers = []
    seen: dict[str, tuple[int, int]] = {}  # matrix -> (non-zeros, entries)
    for p in find_pairs(ck):
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
        "fpewiden": {k: v for k, v in meta.public().items() if k not in {"layers", "pairs"}},
        "layers": layers,
        "totals": {
            "neurons": sum(r["neurons"] for r in layers),
            "nnz": nnz_total,
            "params": params_total,
            "density": nnz_total / params_total if params_total else 0.0,
        },
    }
