"""Whether a quantized sparse layout pays on the avx2 kernels: each layout run as stored against the same values
spread to the dense layout (what PackedLinear and the ONNX Runtime op run where fpw_runs_spread says so).

Matrices (y = W x, Llama-7B FFN shapes, random weights, int8 and int4 values, one scale per row / per 32 inputs):
  bitmask d   11008×4096 with a random fraction d of the weights kept (d = 0.05, 0.1, 0.25, 0.5)
  parent      22016×4096, an FPE α=2 incoming matrix (every parent weight held by one of its two children)
  down 50%    4096×22016 at 50%, the widened outgoing matrix of the same pair (bitmask)
Each at batch 1, 4 and 16 (`--batches`), in one process, rounds in random order (bench/packed.py's timer),
medians; the stored layout's latency over the spread one's (above 1: spreading is faster), and what fpewiden's
layer runs by default (fpw_runs_spread; its mode as crossover.py measures it).

  FPEWIDEN_KERNEL=avx2 python bench/avx2_spread.py [--threads 1 --batches 1,4,16 --out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packed import timed  # bench/packed.py: the interleaved timer

from fpewiden.benchmark.machine import cpu_name
from fpewiden.packed import crossover, kernels
from fpewiden.packed import format as fmt
from fpewiden.packed.ops import PackedLinear

DTYPES = {"int8": torch.int8, "int4": fmt.INT4}


def matrices(g: torch.Generator) -> dict[str, tuple[torch.Tensor, str]]:
    """name -> (weights, layout) of the cases above."""
    base = torch.empty(11008, 4096).uniform_(-1, 1, generator=g) / 64
    out: dict[str, tuple] = {}
    for d in (0.05, 0.1, 0.25, 0.5):
        out[f"bitmask {d:g}"] = (base * (torch.rand(base.shape, generator=g) < d), "bitmask")
    child = torch.randint(0, 2, (11008, 1, 4096), generator=g)
    wide = torch.zeros(11008, 2, 4096).scatter_(1, child, base.unsqueeze(1)).reshape(22016, 4096)
    out["parent α=2"] = (wide, "parent")
    down = torch.empty(4096, 22016).uniform_(-1, 1, generator=g) / 148
    out["down 50%"] = (down * (torch.rand(down.shape, generator=g) < 0.5), "bitmask")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of interleaved rounds per measurement")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantized/avx2_spread"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, (w, layout) in matrices(g).items():
        for dname, dtype in DTYPES.items():
            stored = fmt.pack_parent(w, 2, dtype) if layout == "parent" else fmt.pack_bitmask(w, dtype)
            layers = {"stored": PackedLinear(stored, spread=False), "spread": PackedLinear(fmt.pack_dense(w, dtype)),
                      "fpewiden": PackedLinear(stored)}  # fmt: skip
            crossover.tune(list(layers.values()))
            default = layers["fpewiden"].running.format == "dense"  # what fpw_runs_spread chooses on this path
            for batch in map(int, args.batches.split(",")):
                x = torch.randn(batch, w.shape[1], generator=g)
                with torch.inference_mode():
                    t = timed({k: (lambda m=m, x=x: m(x)) for k, m in layers.items()}, args.budget)
                ms = {k: t[k]["median_ms"] for k in layers}
                rows.append({"matrix": name, "dtype": dname, "batch": batch, "stored_ms": ms["stored"],
                             "spread_ms": ms["spread"], "fpewiden_ms": ms["fpewiden"],
                             "ratio": ms["stored"] / ms["spread"], "spread by default": default,
                             "fpewiden_mode": layers["fpewiden"].mode(batch)})  # fmt: skip
                print(f"{name:12} {dname} batch {batch:2}: stored {ms['stored']:7.2f} ms, spread "
                      f"{ms['spread']:7.2f} ms ({ms['stored'] / ms['spread']:.2f}×), fpewiden {ms['fpewiden']:7.2f} "
                      f"ms", flush=True)  # fmt: skip
    cpu = cpu_name()
    forced = os.environ.get(kernels.ENV)
    command = (f"{kernels.ENV}={forced} " if forced else "") + "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"command": command, "cpu": cpu, "kernels": kernels.path(), "threads": args.threads, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Quantized sparse layouts against their values spread to the dense layout", "", f"`{command}`", "",
             f"CPU: {cpu}; fpewiden kernels: {kernels.path()}; {args.threads} thread(s); torch {torch.__version__}. "
             "stored × = the stored layout's median latency over the spread (dense) one's in the same interleaved "
             "rounds; above 1 the spread runs faster. fpewiden = what a loaded layer runs: where `spread` says yes, "
             "its crossover's pick among the spread values and the stored layout's kernels (its measured mode; "
             "gemv: the spread values).", "",
             "| matrix | values | batch | stored ms | spread ms | stored × | spread | fpewiden ms (mode) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['matrix']} | {r['dtype']} | {r['batch']} | {r['stored_ms']:.2f} | {r['spread_ms']:.2f} | "
                     f"{r['ratio']:.2f} | {'yes' if r['spread by default'] else 'no'} | {r['fpewiden_ms']:.2f} "
                     f"({r['fpewiden_mode']}) |")  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
