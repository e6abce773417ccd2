"""The README's main job with the threads fpewiden picks (`--threads 0`: one for a model this small) against
torch's default (one per core), on a quiet machine and with one core kept busy by another process (as on a
shared CI machine). Runs alternate so noise hits both settings alike; medians are compared.

  python bench/threads.py [--rounds 3 --out bench/results/threads]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fpewiden.io.provenance import MD_MARKER, json_document
from fpewiden.train.trainer import available_cores


def time_run(threads: int, work: Path) -> float:
    out = work / f"run_{threads}_{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "fpewiden", "run", "polysemantic", "--out", str(out), "--threads", str(threads)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/results/threads"))
    args = ap.parse_args()
    cores = available_cores()
    settings = {"fpewiden's choice (--threads 0: 1 thread)": 0, f"torch default ({cores} threads)": cores}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for load in (False, True):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load else None
            try:
                times: dict[str, list[float]] = {k: [] for k in settings}
                for _ in range(args.rounds):
                    for label, n in settings.items():
                        times[label].append(time_run(n, Path(d)))
            finally:
                if hog:
                    hog.kill()
                    hog.wait()
            for label, ts in times.items():
                rows.append({"setting": label, "busy_core": load, "median_s": statistics.median(ts), "runs_s": ts})
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    doc = json_document({"command": command, "cores": cores, "rows": rows})
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Threads for the README's main job",
        "",
        f"`{command}` — `fpewiden run polysemantic` (3 seeds, 4 models each, closing bench), wall-clock seconds, "
        f"median of {args.rounds} alternating runs on {cores} cores.",
        "",
        "| setting | other load | median s | runs |",
        "|---|---|---|---|",
    ]
    for r in rows:
        load = "one core busy" if r["busy_core"] else "none"
        runs = ", ".join(f"{t:.1f}" for t in r["runs_s"])
        lines.append(f"| {r['setting']} | {load} | {r['median_s']:.1f} | {runs} |")
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
