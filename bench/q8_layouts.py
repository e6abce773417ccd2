"""int8 values at batch 1, layout by layout: each matrix's latency and the rate its stored bytes stream at.

The Llama-7B FFN pair (4096→11008→4096, random weights) and what fpewiden makes of it, every matrix packed with
int8 values (a scale per row) and run by the int8-input kernel at one input:

  dense up / down          the original matrices, dense layout
  parent up                an FPE α=2 incoming matrix that holds every parent weight (22016×4096: each weight in
                           one of its two children), parent layout (the parent's values once + a child bit each)
  FPE up / down            `convert --alpha 2` of the pair (same non-zero count), as `pack --dtype int8` stores it:
                           the pair's pruning keeps 77% of the incoming parent weights, so both are bitmask
  50% up / down            each original matrix with a random half kept, bitmask

One process, one thread, matrices interleaved round by round (bench/packed.py's timer), medians. GB/s: stored
bytes (values, bits, offsets, scales) over the median; a layout that streams as fast as dense has its bytes'
share of dense's time.

  python bench/q8_layouts.py [--out bench/results/quantized/q8_layouts]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_competitors import dense_pair, fpe_int8
from packed import timed

from fpewiden.benchmark.machine import cpu_name
from fpewiden.io.provenance import MD_MARKER, json_document
from fpewiden.packed import format as fmt
from fpewiden.packed import kernels
from fpewiden.packed.ops import PackedLinear

TABLE = [(8, "gemv")]  # one input: the decode kernel, whatever a crossover would measure


def layers(work: Path) -> dict[str, PackedLinear]:
    g = torch.Generator().manual_seed(1)
    up, down = dense_pair(0)
    child = torch.randint(0, 2, (up.out_features, 1, up.in_features), generator=g)
    wide = torch.zeros(up.out_features, 2, up.in_features).scatter_(1, child, up.weight.detach().unsqueeze(1))
    fpe = fpe_int8(up, down, work)
    half = [m.weight.detach() * (torch.rand(m.weight.shape, generator=g) < 0.5) for m in (up, down)]
    out = {
        "dense up": fmt.pack_dense(up.weight.detach(), torch.int8),
        "dense down": fmt.pack_dense(down.weight.detach(), torch.int8),
        "parent up": fmt.pack_parent(wide.reshape(-1, up.in_features), 2, torch.int8),
        "FPE up": fpe.up.packed,
        "FPE down": fpe.down.packed,
        "50% up": fmt.pack_bitmask(half[0], torch.int8),
        "50% down": fmt.pack_bitmask(half[1], torch.int8),
    }
    return {k: PackedLinear(pm, table=TABLE) for k, pm in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=6.0, help="seconds of interleaved rounds")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantized/q8_layouts"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        ls = layers(Path(d))
    g = torch.Generator().manual_seed(2)
    xs = {n: torch.randn(1, n, generator=g) for n in {m.in_features for m in ls.values()}}
    with torch.inference_mode():
        t = timed({k: (lambda m=m: m(xs[m.in_features])) for k, m in ls.items()}, args.budget)
    rows = [{"matrix": k, "layout": m.running.format, "shape": [m.out_features, m.in_features],
             "mb": m.nbytes / 1e6, "median_ms": t[k]["median_ms"], "gb_s": m.nbytes / 1e6 / t[k]["median_ms"]}
            for k, m in ls.items()]  # fmt: skip
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = json_document({"command": command, "cpu": cpu_name(), "kernels": kernels.path(), "rows": rows})
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        "# int8 values at batch 1, layout by layout (Llama-7B FFN shapes)",
        "",
        f"`{command}`",
        "",
        f"CPU: {cpu_name()}; fpewiden kernels: {kernels.path()}; one thread, one input, interleaved rounds, medians.",
        "",
        "| matrix | layout | shape | stored MB | median ms | GB/s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['matrix']} | {r['layout']} | {r['shape'][0]}×{r['shape'][1]} | {r['mb']:.1f} | "
              f"{r['median_ms']:.3f} | {r['gb_s']:.1f} |" for r in rows]  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
