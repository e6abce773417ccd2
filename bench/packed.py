"""Packed kernels against torch dense, on the shapes that matter, in one process, round-robin, medians.

Matrices (y = W x, fp32 unless named; bf16 compared with torch's bf16):
  llama-up 11008×4096, llama-down 4096×11008 (Llama-7B's FFN), minilm-up 1536×384, minilm-down 384×1536;
  50%:  random 50% of the weights kept (what `--alpha 1 --budget 0.5` leaves), bitmask;
  fpe:  the whole FFN pair 4096→11008→4096 converted by `fpewiden convert --alpha 2` (budget same, random split,
        copied outgoing) and packed as `fpewiden pack` does, against the dense original pair (the pair's latency
        is both layers and the activation); with `--pairs`.
For each, batch 1/4/16/32/128: torch dense (F.linear), the packed layer in its measured mode (crossover.py), and
every mode alone (gemv, spmm, dense = unpack + torch GEMM). Ratios are against torch dense in the same round.

  python bench/packed.py [--threads 1,2 --batches 1,4,16,32,128 --dtypes fp32,bf16 --out bench/results/packed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from fpewiden.benchmark.machine import cpu_name
from fpewiden.io.provenance import MD_MARKER, json_document
from fpewiden.packed import crossover, kernels
from fpewiden.packed import format as fmt
from fpewiden.packed.ops import MODES, PackedLinear

SHAPES = {"llama-up": (11008, 4096), "llama-down": (4096, 11008), "minilm-up": (1536, 384), "minilm-down": (384, 1536)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def timed(fns: dict, budget_s: float, min_rounds: int = 7, max_rounds: int = 200) -> dict[str, dict]:
    """Median, p10 and p90 per function over interleaved rounds (each round calls every function once, in a
    fresh random order)."""
    for f in fns.values():
        f()
    t0 = time.perf_counter()
    for f in fns.values():
        f()
    per_round = time.perf_counter() - t0
    rounds = int(min(max_rounds, max(min_rounds, budget_s / max(per_round, 1e-9))))
    times: dict[str, list[float]] = {k: [] for k in fns}
    keys = list(fns)
    order = random.Random(0)
    for _ in range(rounds):
        for k in order.sample(keys, len(keys)):  # no function always follows the same one (caches)
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    out = {}
    for k, ts in times.items():
        ts.sort()
        out[k] = {"median_ms": statistics.median(ts) * 1e3, "p10_ms": ts[len(ts) // 10] * 1e3,
                  "p90_ms": ts[(9 * len(ts)) // 10] * 1e3, "rounds": rounds}  # fmt: skip
    return out


def half(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.empty(rows, cols).uniform_(-1, 1, generator=g) / cols**0.5
    return w * (torch.rand(rows, cols, generator=g) < 0.5)


def matrix_rows(args, threads: int) -> list[dict]:
    rows = []
    for name, (r, c) in SHAPES.items():
        w = half(r, c, 0)
        dense_w = torch.empty(r, c).uniform_(-1, 1) / c**0.5
        for dname in args.dtypes:
            dt = DTYPES[dname]
            layer = PackedLinear(fmt.pack_bitmask(w, dt))
            crossover.tune([layer])
            wd = dense_w.to(dt)
            wh = torch.ops.fpewiden.hugepage_copy(wd)  # the same advantage fpewiden's loader gives packed values
            for b in args.batches:
                x = torch.randn(b, c)
                xd = x.to(dt)
                fns = {
                    "torch dense": lambda xd=xd, wd=wd: F.linear(xd, wd),
                    "torch dense, huge pages": lambda xd=xd, wh=wh: F.linear(xd, wh),
                    "packed": lambda x=x, layer=layer: layer(x),
                }
                fns |= {f"mode {m}": (lambda x=x, m=m, layer=layer: layer(x, mode=m)) for m in MODES}
                if b > 32:
                    fns.pop("mode gemv")
                res = timed(fns, args.budget)
                base = res["torch dense"]["median_ms"]
                row = {"matrix": name, "shape": [r, c], "format": "50% bitmask", "dtype": dname, "batch": b,
                       "threads": threads, "mode": layer.mode(b), "bytes_dense": r * c * fmt.DTYPE_SIZE[dt],
                       "bytes_packed": layer.nbytes, "timings": res,
                       "ratio": {k: v["median_ms"] / base for k, v in res.items()}}  # fmt: skip
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "timings"}), flush=True)
    return rows


def fpe_pair(work: Path) -> tuple[list[fmt.PackedMatrix], list[torch.Tensor]]:
    """The Llama-7B-shaped FFN pair converted by fpewiden (α=2, budget same), packed; and the dense original."""
    from safetensors.torch import save_file

    from fpewiden.convert import ConvertOptions, convert
    from fpewiden.packed.pack import pack_checkpoint
    from fpewiden.packed.reader import read_packed

    torch.manual_seed(0)
    up, down = torch.nn.Linear(4096, 11008, bias=False), torch.nn.Linear(11008, 4096, bias=False)
    src = work / "pair.safetensors"
    save_file({"0.weight": up.weight.data, "2.weight": down.weight.data}, str(src))
    convert(src, work / "fpe.safetensors", ConvertOptions(alpha=2))
    pack_checkpoint(work / "fpe.safetensors", work / "fpe.packed.safetensors")
    pc = read_packed(work / "fpe.packed.safetensors")
    return [pc.packed("0.weight"), pc.packed("2.weight")], [up.weight.data, down.weight.data]


def pair_rows(args, threads: int, work: Path) -> list[dict]:
    packed, dense = fpe_pair(work)
    rows = []
    for dname in args.dtypes:
        dt = DTYPES[dname]
        layers = [PackedLinear(dataclasses.replace(pm, values=pm.values.to(dt))) for pm in packed]
        crossover.tune(layers)
        dw = [w.to(dt) for w in dense]
        dh = [torch.ops.fpewiden.hugepage_copy(w) for w in dw]
        for b in args.batches:
            x = torch.randn(b, 4096)
            xd = x.to(dt)
            fns = {
                "torch dense pair": lambda xd=xd, dw=dw: F.linear(F.relu(F.linear(xd, dw[0])), dw[1]),
                "torch dense pair, huge pages": lambda xd=xd, dh=dh: F.linear(F.relu(F.linear(xd, dh[0])), dh[1]),
                "packed pair": lambda x=x, layers=layers: layers[1](F.relu(layers[0](x))),
            }
            res = timed(fns, args.budget)
            base = res["torch dense pair"]["median_ms"]
            dense_bytes = sum(w.numel() for w in dense) * fmt.DTYPE_SIZE[dt]
            row = {"matrix": "llama pair 4096→11008→4096", "format": "FPE α=2 same (" +
                   " + ".join(pm.format for pm in packed) + ")", "dtype": dname, "batch": b, "threads": threads,
                   "modes": [m.mode(b) for m in layers], "bytes_dense": dense_bytes,
                   "bytes_packed": sum(m.nbytes for m in layers),
                   "densities": [pm.nnz / (pm.rows * pm.cols) if pm.format == "bitmask" else None for pm in packed],
                   "timings": res, "ratio": {k: v["median_ms"] / base for k, v in res.items()}}  # fmt: skip
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "timings"}), flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Packed kernels against torch dense",
        "",
        f"`{command}`",
        "",
        f"CPU: {cpu_name()}; kernels: {kernels.path()}; torch {torch.__version__}. Latency ratios against torch's "
        "dense F.linear at the same dtype, batch and thread count, interleaved round by round (medians). Bytes: "
        "weights moved per call. `packed` runs the mode the crossover measurement chose for that batch.",
        "",
        "| matrix | format | dtype | threads | batch | bytes (packed / dense) | torch dense ms | torch dense, huge "
        "pages | packed (mode) | gemv | spmm | unpack+GEMM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["timings"]
        base = t.get("torch dense", t.get("torch dense pair"))["median_ms"]
        packed_key = "packed" if "packed" in t else "packed pair"
        mode = r.get("mode") or "+".join(r.get("modes", []))
        modes = [f"{t[f'mode {m}']['median_ms'] / base:.2f}×" if f"mode {m}" in t else "-" for m in MODES]
        huge = t.get("torch dense, huge pages", t.get("torch dense pair, huge pages"))
        lines.append(
            f"| {r['matrix']} | {r['format']} | {r['dtype']} | {r['threads']} | {r['batch']} | "
            f"{r['bytes_packed'] / r['bytes_dense']:.3f} | {base:.3f} | {huge['median_ms'] / base:.2f}× | "
            f"**{t[packed_key]['median_ms'] / base:.2f}×** ({mode}) | " + " | ".join(modes) + " |"
        )
    return "\n".join(lines) + f"\n\n{MD_MARKER}\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,4,16,32,128")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds of interleaved rounds per measurement")
    ap.add_argument("--no-matrices", action="store_true")
    ap.add_argument("--pairs", action="store_true", help="also the FPE α=2 Llama-shaped pair")
    ap.add_argument("--out", type=Path, default=Path("bench/results/packed"))
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.dtypes = args.dtypes.split(",")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            if not args.no_matrices:
                rows += matrix_rows(args, threads)
            if args.pairs:
                rows += pair_rows(args, threads, Path(d))
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = json_document({"command": command, "cpu": cpu_name(), "kernels": kernels.path(), "rows": rows})
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
