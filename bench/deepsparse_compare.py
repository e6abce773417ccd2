"""The anchor: DeepSparse 1.8.0 (Neural Magic's sparse CPU runtime, end of life; its last release with a wheel) on
the matrices bench/packed.py times, in its own virtual environment (it pins onnx<1.15 and numpy<2; a
benchmark-only comparison, never a dependency of fpewiden):

  python3.11 -m venv /tmp/ds && /tmp/ds/bin/pip install deepsparse==1.8.0 "onnx<1.15" "numpy<2"
  /tmp/ds/bin/python bench/deepsparse_compare.py [--threads 1,2 --batches 1,32 --out bench/results/deepsparse]

Each matrix is an ONNX MatMul y = x Wᵀ with W 50% random zeros (numpy's generator: the same shapes and density as
bench/packed.py, not the same values), compiled by DeepSparse for a fixed batch, and the same MatMul with a
dense W; latency ratio sparse / dense in this process, interleaved, medians. Imports nothing of fpewiden.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPES = {"llama-up": (11008, 4096), "llama-down": (4096, 11008), "minilm-up": (1536, 384), "minilm-down": (384, 1536)}


def matmul_model(w: np.ndarray, path: Path) -> None:
    rows, cols = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", cols])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", rows])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def main() -> None:
    from deepsparse import Engine

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/deepsparse"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, (r, c) in SHAPES.items():
            dense = (rng.uniform(-1, 1, (r, c)) / np.sqrt(c)).astype(np.float32)
            sparse = dense * (rng.random((r, c)) < 0.5)
            paths = {"dense": Path(d) / f"{name}-dense.onnx", "50%": Path(d) / f"{name}-half.onnx"}
            matmul_model(dense, paths["dense"])
            matmul_model(sparse.astype(np.float32), paths["50%"])
            for threads in [int(t) for t in args.threads.split(",")]:
                for b in [int(x) for x in args.batches.split(",")]:
                    engines = {k: Engine(str(p), batch_size=b, num_cores=threads) for k, p in paths.items()}
                    x = [rng.standard_normal((b, c)).astype(np.float32)]
                    for e in engines.values():
                        e.run(x)
                    t0 = time.perf_counter()
                    for e in engines.values():
                        e.run(x)
                    n = int(min(300, max(7, args.budget / max(time.perf_counter() - t0, 1e-6))))
                    times = {k: [] for k in engines}
                    for i in range(n):
                        order = list(engines)[i % 2 :] + list(engines)[: i % 2]
                        for k in order:
                            t = time.perf_counter()
                            engines[k].run(x)
                            times[k].append(time.perf_counter() - t)
                    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                    row = {"matrix": name, "shape": [r, c], "batch": b, "threads": threads, "rounds": n,
                           "deepsparse_dense_ms": med["dense"], "deepsparse_50_ms": med["50%"],
                           "ratio": med["50%"] / med["dense"]}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    head = "| matrix | threads | batch | DeepSparse dense ms | DeepSparse 50% ms | ratio |"
    lines = ["# DeepSparse 1.8.0 on the packed benchmark's matrices", "", f"`{command}`", "", head, "|---" * 6 + "|"]
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['threads']} | {r['batch']} | {r['deepsparse_dense_ms']:.3f} | "
                     f"{r['deepsparse_50_ms']:.3f} | {r['ratio']:.2f}× |")  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
