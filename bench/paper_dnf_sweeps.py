"""The paper's polysemantic-load sweeps on Boolean DNF tasks, at equal non-zeros, mean over seeds.

(a) 8 hidden neurons, the number of clauses grows: FPE's gain over dense should rise, then saturate.
(b) 8 clauses, the number of neurons grows: the gain should fall as neurons stop being shared.
Each point is a full `fpewiden run` protocol (dense warm-up, convert, fine-tune; dense trained as long) with the
random split at α ∈ {2, 4, 8}. Default task family as recipes/paper_dnf8.yaml (64 inputs, 4 literals, one OR
output, metric accuracy); `--outputs clauses --inputs 32 --literals 3` is the main job's family (one output per
clause, metric exact match), where accuracy does not drift with the share of positive samples.

  python bench/paper_dnf_sweeps.py [--seeds 0,1,2 --epochs 40 --warmup 5 --outputs or|clauses --out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from fpewiden.recipes import Conversion, ModelSpec, Recipe
from fpewiden.run import run_recipe

CLAUSES = (2, 4, 8, 16, 24, 32)
NEURONS = (4, 8, 16, 32)
ALPHAS = (2, 4, 8)


def point(clauses: int, neurons: int, args, work: Path) -> dict:
    recipe = Recipe(
        name=f"dnf c{clauses} h{neurons}",
        data=f"dnf:inputs={args.inputs},clauses={clauses},literals={args.literals},outputs={args.outputs},n=8000",
        model=ModelSpec(hidden=[neurons]),
        epochs=args.epochs,
        warmup_epochs=args.warmup,
        conversions=[Conversion(alpha=a, split="random") for a in ALPHAS],
        seeds=args.seeds,
        lr=0.01,
        bench_repeat=0,
    )
    result = run_recipe(recipe, work / f"c{clauses}_h{neurons}")
    acc = {s["model"]: s[args.metric]["mean"] for s in result["summary"]}
    std = {s["model"]: s[args.metric]["std"] for s in result["summary"]}
    dense = acc.pop("dense")
    return {
        "clauses": clauses,
        "neurons": neurons,
        "dense": dense,
        "dense_std": std["dense"],
        # None: every seed's conversion left out (the budget would empty a layer: fpewiden run says why)
        **{f"alpha{a}": acc.get(f"FPE α={a} random") for a in ALPHAS},
        **{f"alpha{a}_std": std.get(f"FPE α={a} random") for a in ALPHAS},
        "left_out": result["left_out"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--literals", type=int, default=4)
    ap.add_argument("--outputs", choices=["or", "clauses"], default="or")
    ap.add_argument("--out", type=Path, default=Path("bench/results/paper_dnf_sweeps"))
    args = ap.parse_args()
    args.metric = "accuracy" if args.outputs == "or" else "exact_match"
    args.seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as d:
        by_clauses = [point(c, 8, args, Path(d)) for c in CLAUSES]
        by_neurons = [point(8, h, args, Path(d)) for h in NEURONS]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {"command": "python " + " ".join(sys.argv), "by_clauses": by_clauses, "by_neurons": by_neurons}, indent=2
        )
    )
    lines = [
        f"# DNF load sweeps: {args.inputs} inputs, {args.literals} literals, outputs={args.outputs}",
        "",
        f"`{' '.join(sys.argv)}` — held-out {args.metric}, mean ± std over seeds {args.seeds}",
        "",
    ]
    for title, rows, key in (
        ("8 neurons, clauses vary", by_clauses, "clauses"),
        ("8 clauses, neurons vary", by_neurons, "neurons"),
    ):
        lines += [
            f"## {title}",
            "",
            f"| {key} | dense | α=2 | α=4 | α=8 | gain α=2 | gain α=4 | gain α=8 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r[key]} | {r['dense']:.3f} ± {r['dense_std']:.3f} | "
                + " | ".join(
                    f"{r[f'alpha{a}']:.3f} ± {r[f'alpha{a}_std']:.3f}" if r[f"alpha{a}"] is not None else "left out"
                    for a in ALPHAS
                )
                + " | "
                + " | ".join(
                    f"{r[f'alpha{a}'] - r['dense']:+.3f}" if r[f"alpha{a}"] is not None else "-" for a in ALPHAS
                )
                + " |"
            )
        lines.append("")
    (args.out / "results.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, rows, key in ((axes[0], by_clauses, "clauses"), (axes[1], by_neurons, "neurons")):
        for a in ALPHAS:
            gains = [r[f"alpha{a}"] - r["dense"] if r[f"alpha{a}"] is not None else float("nan") for r in rows]
            ax.plot([r[key] for r in rows], gains, marker="o", label=f"α={a}")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(key + (" (8 neurons)" if key == "clauses" else " (8 clauses)"))
        ax.set_ylabel(f"FPE {args.metric} − dense {args.metric}")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "gains.png", dpi=110)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
