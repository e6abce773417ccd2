"""Peak memory of calibrating one Llama-shaped pair, at the code of one or more commits: what token chunks and the
in-place statistics changed, pair by pair (bench/calibration_memory.py measures a whole checkpoint).

A gated pair 2048→5632→2048 (SiLU, random weights) on 16,393 random tokens (the TREC calibration set's count),
`--alpha 1`, half its non-zeros, solver auto (conjugate gradients at this width), 2 threads. Each commit runs in
its own process from a git worktree of it; the peak is the process's VmHWM above its VmRSS just before the call
(inputs and weights already made), so it is the pair's own working set.

  python bench/calibration_pair_memory.py --commits b5503d5,3f5c12d,HEAD [--out bench/results/calibration_pair_memory]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, time, torch
torch.set_num_threads(2)
from fpewiden.convert.options import ConvertOptions
from fpewiden.convert.transform import assignment, pair_seed
from fpewiden.fpe.calibrated import CalibratedOptions, calibrate_pair
from fpewiden.fpe.pair_function import PairFunction
from fpewiden.fpe.expand import Pair
try:  # where the commit has it, as convert calls it
    from fpewiden.memory import return_freed_memory
    return_freed_memory()
except ImportError:
    pass
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
hidden, ffn, tokens = 2048, 5632, 16393
torch.manual_seed(0)
gate, up = (torch.randn(ffn, hidden) / hidden**0.5 for _ in range(2))
down = torch.randn(hidden, ffn) / ffn**0.5
x = torch.randn(tokens, hidden)
pair = Pair([gate, up], [gate != 0, up != 0], [None, None], down, down != 0)
fn = PairFunction(torch.nn.functional.silu, gated=True)
opts = ConvertOptions(alpha=1)
split = lambda p, support, chosen: assignment(opts, p, support, torch.Generator().manual_seed(pair_seed(0, "pair")))
base = status("VmRSS")
t = time.perf_counter()
res = calibrate_pair(pair, x, fn, None, CalibratedOptions(alpha=1, fraction=0.0), split, pair.nnz() // 2)
print(json.dumps({"peak_net_bytes": status("VmHWM") - base, "seconds": time.perf_counter() - t,
                  "output_error": res.error_after, "solvers": res.solvers}))
"""


def run(commit: str, tmp: Path) -> dict:
    tree = tmp / commit
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), commit], check=True,
                   capture_output=True)  # fmt: skip
    try:
        sha = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=tree,
                             env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"})  # fmt: skip
        if res.returncode:
            raise SystemExit(res.stderr[-3000:])
        return {"commit": commit, "sha": sha, **json.loads(res.stdout.strip().splitlines()[-1])}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--commits", default="HEAD")
    ap.add_argument("--out", type=Path, default=Path("bench/results/calibration_pair_memory"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for c in args.commits.split(","):
            rows.append(run(c, Path(d)))
            print(json.dumps(rows[-1]), flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        "# Peak memory of calibrating one pair, by commit", "", f"`{command}`", "",
        "Gated pair 2048→5632→2048, 16,393 tokens, α=1, half the non-zeros, solver auto, 2 threads; peak = VmHWM "
        "above VmRSS just before the call (the pair's own working set).", "",
        "| commit | peak, net MB | seconds | output error | solvers |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['commit']} ({r['sha']}) | {r['peak_net_bytes'] / 2**20:.0f} | {r['seconds']:.0f} | "
                     f"{r['output_error']:.6f} | {'/'.join(r['solvers'])} |")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
