"""Paired differences between two models of one `fpewiden run`, seed by seed.

Every model of a seed starts from the same warm-up on the same task, so the per-seed difference is a sharper
comparison than two means ± std side by side (the task itself changes with the seed).

  python bench/paired.py bench/results/paper_dropconnect "FPE α=2 random" "dense + DropConnect 0.1" \
      [--metric exact_match] [--out bench/results/paper_dropconnect/paired.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path


def paired(results: dict, a: str, b: str, metric: str) -> dict:
    by: dict[str, dict[int, float]] = {}
    for run in results["runs"]:
        if metric in run["final"]:
            by.setdefault(run["model"], {})[run["seed"]] = run["final"][metric]
    missing = [m for m in (a, b) if m not in by]
    if missing:
        raise SystemExit(f"no model {missing[0]!r} with {metric}; models: {', '.join(by)}")
    seeds = sorted(set(by[a]) & set(by[b]))
    diffs = [by[a][s] - by[b][s] for s in seeds]
    return {
        "a": a,
        "b": b,
        "metric": metric,
        "seeds": seeds,
        "differences": diffs,
        "mean": statistics.fmean(diffs),
        "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        "a_ahead": sum(d > 0 for d in diffs),
        "b_ahead": sum(d < 0 for d in diffs),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path, help="an `fpewiden run` output directory (its results.json)")
    ap.add_argument("pairs", nargs="+", help="model labels: A B [A B ...]; each A is compared with its B")
    ap.add_argument("--metric", default="exact_match")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if len(args.pairs) % 2:
        raise SystemExit("give model labels in pairs: A B [A B ...]")
    results = json.loads((args.run / "results.json").read_text())
    rows = [paired(results, a, b, args.metric) for a, b in zip(args.pairs[::2], args.pairs[1::2], strict=True)]
    for r in rows:
        print(
            f"{r['a']} − {r['b']} ({r['metric']}, {len(r['seeds'])} seeds): {r['mean']:+.4f} ± {r['std']:.4f}; "
            f"ahead on {r['a_ahead']}, behind on {r['b_ahead']}"
        )
    if args.out:
        args.out.write_text(json.dumps({"command": "python " + shlex.join(sys.argv), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
