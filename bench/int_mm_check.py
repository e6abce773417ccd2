"""Is torch's CPU int8 GEMM (torch._int_mm, oneDNN underneath) exact on this machine, per instruction set?

oneDNN picks its s8·s8 kernel by ISA; ONEDNN_MAX_CPU_ISA caps it (read once, at start-up: each ISA runs in a
process of its own). For each cap: 100 random products (M, N ≤ 70, K ≤ 600, values in [-127, 127], what
fpewiden's int8_mm feeds it) against an int32 reference, and products with one input column (K = 1). fpewiden
runs int8_mm only where this is exact (ops.py).

  python bench/int_mm_check.py [--isas AVX2,AVX512_CORE,AVX512_CORE_VNNI --out bench/results/int_mm_check]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from fpewiden.benchmark.machine import cpu_name

CHECK = """
import json, random, torch
random.seed(0)
wrong = worst = 0
for _ in range(100):
    m, k, n = random.randint(2, 70), random.randint(2, 600), random.randint(1, 70)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    r, ref = torch._int_mm(a, b.t()), a.int() @ b.int().t()
    if not torch.equal(r, ref):
        wrong += 1
        worst = max(worst, int((r - ref).abs().max()))
one = 0
for m, n in ((1, 1), (2, 3), (3, 16), (17, 3)):
    a = torch.randint(-127, 128, (m, 1), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, 1), dtype=torch.int8)
    one += not torch.equal(torch._int_mm(a, b.t()), a.int() @ b.int().t())
print(json.dumps({"wrong": wrong, "worst": worst, "k1_wrong": one, "torch": torch.__version__}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--isas", default="AVX2,AVX512_CORE,AVX512_CORE_VNNI")
    ap.add_argument("--out", type=Path, default=Path("bench/results/int_mm_check"))
    args = ap.parse_args()
    cpu = cpu_name()
    rows = []
    for isa in args.isas.split(","):
        env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
        out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, check=True)
        rows.append({"isa": isa, **json.loads(out.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "cpu": cpu, "rows": rows}, indent=1))
    lines = [f"# torch._int_mm exactness by oneDNN ISA cap ({cpu})", "", f"`{command}`", "",
             "| ONEDNN_MAX_CPU_ISA | wrong of 100 products | largest error | wrong of 4 with K = 1 | torch |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['isa']} | {r['wrong']} | {r['worst']} | {r['k1_wrong']} | {r['torch']} |" for r in rows]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
