"""Calibrated conversion of one Llama-shaped FFN pair against its width: the refit solvers side by side.

A gated pair hidden → ffn → hidden (gate and up, SiLU, down; ffn = 2.75 × hidden as in Llama) with torch's Linear
init, calibration inputs of `--tokens` rows drawn from a correlated Gaussian (x = z·A, A random), converted by
fpe/calibrated.py's `calibrate_pair` at `--alpha` and `--budget` of the pair's non-zeros with each solver:
  exact  one Cholesky per output row (the reference; O(rows · kept³)),
  obs    SparseGPT's update of the dense ridge solution (one inverse per matrix),
  cg     conjugate gradients to the exact masked solution (one matrix multiply per iteration).
Each run is its own process: wall time, peak RSS (VmHWM) and the relative output error on 1,024 held-out rows.
`exact` is skipped above `--exact-max` hidden (a Llama-7B layer would take more than a day).

  python bench/calibration_solver.py [--widths 512,1024,2048,4096 --alphas 1,2 --out bench/results/calibration_solver]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
from fpewiden.fpe.calibrated import CalibratedOptions, calibrate_pair
from fpewiden.fpe.pair_function import PairFunction, pair_output
from fpewiden.fpe.expand import Pair
from fpewiden.convert.transform import assignment, pair_seed
from fpewiden.convert.options import ConvertOptions
hidden, alpha, tokens, threads = (int(sys.argv[i]) for i in (1, 2, 4, 6))
budget, solver = float(sys.argv[3]), sys.argv[5]
torch.set_num_threads(threads)
torch.manual_seed(0)
ffn = int(round(2.75 * hidden / 64)) * 64
gate, up = torch.nn.Linear(hidden, ffn, bias=False), torch.nn.Linear(hidden, ffn, bias=False)
down = torch.nn.Linear(ffn, hidden, bias=False)
A = torch.randn(hidden, hidden) / hidden ** 0.5
x_all = torch.randn(tokens + 1024, hidden) @ A + 0.1 * torch.randn(tokens + 1024, hidden)
x, held = x_all[:tokens], x_all[tokens:]
w_in = [gate.weight.data, up.weight.data]
pair = Pair(w_in, [w != 0 for w in w_in], [None, None], down.weight.data, down.weight.data != 0)
fn = PairFunction(torch.nn.functional.silu, gated=True)
opts = ConvertOptions(alpha=alpha)
gen = lambda: torch.Generator().manual_seed(pair_seed(0, "pair"))
split = lambda p, support, chosen: assignment(opts, p, support, gen())
n = round(budget * pair.nnz())
t = time.perf_counter()
res = calibrate_pair(pair, x, fn, None, CalibratedOptions(alpha, 1.0 if alpha > 1 else 0.0, solver=solver), split, n)
seconds = time.perf_counter() - t
ref = pair_output(pair, held, fn, None)
got = pair_output(res.pair, held, fn, None)
err = float((got - ref).norm() / ref.norm())
hwm = int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024
print(json.dumps({"hidden": hidden, "ffn": ffn, "alpha": alpha, "budget": budget, "tokens": tokens, "solver": solver,
                  "threads": threads, "seconds": seconds, "peak_rss_mb": hwm, "held_out_error": err,
                  "nnz": int(sum(int(m.sum()) for m in (*res.pair.m_in, res.pair.m_out))), "target_nnz": n,
                  "solvers": res.solvers}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="512,1024,2048,4096")
    ap.add_argument("--alphas", default="1,2")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--solvers", default="exact,obs,cg")
    ap.add_argument("--exact-max", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/calibration_solver"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    done = args.out / "rows.jsonl"  # resumes by row
    rows = [json.loads(line) for line in done.read_text().splitlines()] if done.is_file() else []
    for hidden in [int(w) for w in args.widths.split(",")]:
        for alpha in [int(a) for a in args.alphas.split(",")]:
            for solver in args.solvers.split(","):
                if solver == "exact" and hidden > args.exact_max:
                    continue
                if any(r["hidden"] == hidden and r["alpha"] == alpha and r["solver"] == solver for r in rows):
                    continue
                cmd = [sys.executable, "-c", CHILD, str(hidden), str(alpha), str(args.budget), str(args.tokens),
                       solver, str(args.threads)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-2000:])
                row = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(row)
                with done.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        "# Calibrated conversion of one Llama-shaped FFN pair: the refit solvers against width",
        "",
        f"`{command}`",
        "",
        f"Gated pair hidden → 2.75·hidden → hidden, {args.tokens} calibration rows, budget {args.budget} of the pair's "
        f"non-zeros, {args.threads} threads, each run its own process. Error: relative output error on 1,024 held-out "
        "rows.",
        "",
        "| hidden → ffn | α | solver | seconds | peak RSS MB | held-out error |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["hidden"], r["alpha"], r["solver"])):
        lines.append(
            f"| {r['hidden']} → {r['ffn']} | {r['alpha']} | {r['solver']} | {r['seconds']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['held_out_error']:.4f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    (args.out / "results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
