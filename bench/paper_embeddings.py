"""Classifiers over frozen sentence embeddings: the text analogue of the paper's CLIP-embedding classifiers.

MiniLM (all-MiniLM-L6-v2) embeddings of TREC-6, TREC-50 and SST-5 (`embed:` DATA specs); a one-hidden-layer MLP
of width 4 to 64; FPE α ∈ {2, 4, 8} (random split) against dense at equal non-zeros, with the paper's protocol
(dense warm-up, convert, fine-tune; dense trained as long); and the compression case at width 32: magnitude
pruning to 50% against FPE α=2 with budget 0.5, same fine-tuning. Held-out: the datasets' test splits.

  python bench/paper_embeddings.py [--tasks trec6,trec50,sst5 --widths 4,8,16,32,64 --seeds 0,1,2]

`--dropconnect 0.1,0.25` adds the paper's other baseline to the widening table: the dense model (same neurons,
same non-zeros) fine-tuned after the warm-up with DropConnect at each probability (train/dropconnect.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from fpewiden.recipes import Conversion, ModelSpec, Recipe
from fpewiden.run import run_recipe

ALPHAS = (2, 4, 8)


def cell(result: tuple[float, float, int]) -> str:
    """(mean, std, non-zeros) as a table cell."""
    return f"{result[0]:.4f} ± {result[1]:.4f}"


def data_spec(task: str, args) -> str:
    return f"embed:{task}" + (f",n={args.n}" if args.n else "")


def run(task: str, width: int, conversions: list[Conversion], args, work: Path) -> dict:
    recipe = Recipe(
        name=f"{task} h{width}",
        data=data_spec(task, args),
        model=ModelSpec(hidden=[width]),
        epochs=args.epochs,
        warmup_epochs=args.warmup,
        conversions=conversions,
        seeds=args.seeds,
        lr=3e-3,
        batch_size=128,
        bench_repeat=0,
    )
    result = run_recipe(recipe, work / f"{task}_h{width}_{len(conversions)}")
    return {s["model"]: (s["accuracy"]["mean"], s["accuracy"]["std"], s["nnz"]) for s in result["summary"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="trec6,trec50,sst5")
    ap.add_argument("--widths", default="4,8,16,32,64")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--split", default="random", choices=["random", "feature"])
    ap.add_argument("--dropconnect", default="", help="comma-separated DropConnect probabilities (dense arms)")
    ap.add_argument("--n", type=int, default=0, help="first N training sentences only (quick checks)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/paper_embeddings"))
    args = ap.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    drops = [float(p) for p in args.dropconnect.split(",") if p]
    tasks = args.tasks.split(",")
    widths = [int(w) for w in args.widths.split(",")]
    widen, compress = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for task in tasks:
            arms = [Conversion(alpha=a, split=args.split) for a in ALPHAS]
            arms += [Conversion(alpha=1, dropconnect=p) for p in drops]
            widen[task] = {w: run(task, w, arms, args, Path(d)) for w in widths}
            compress[task] = run(
                task,
                32,
                [Conversion(alpha=1, budget="0.5"), Conversion(alpha=2, split=args.split, budget="0.5")],
                args,
                Path(d),
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "command": "python " + shlex.join(sys.argv),
                "data": [data_spec(t, args) for t in tasks],
                "widen": widen,
                "compress": compress,
            },
            indent=2,
        )
    )
    lines = [
        "# Classifiers over frozen MiniLM embeddings",
        "",
        f"`{' '.join(sys.argv)}` — held-out (test split) accuracy, mean ± std over seeds {args.seeds}",
        "",
    ]
    for task in tasks:
        lines += [
            f"## {task}: widen at equal non-zeros",
            "",
            "| width | dense | FPE α=2 | FPE α=4 | FPE α=8 | best gain |"
            + "".join(f" dense + DropConnect {p} |" for p in drops),
            "|---|---|---|---|---|---|" + "---|" * len(drops),
        ]
        for w, r in widen[task].items():
            dense = r["dense"][0]
            fpe = [r[f"FPE α={a} {args.split}"] for a in ALPHAS]
            lines.append(
                f"| {w} | {cell(r['dense'])} | "
                + " | ".join(cell(v) for v in fpe)
                + f" | {max(m for m, _, _ in fpe) - dense:+.4f} |"
                + "".join(f" {cell(r[f'dense + DropConnect {p}'])} |" for p in drops)
            )
        c = compress[task]
        lines += [
            "",
            f"## {task}: compression at width 32 (50% of the dense non-zeros)",
            "",
            "| model | non-zeros | accuracy |",
            "|---|---|---|",
        ]
        for label, v in c.items():
            lines.append(f"| {label} | {v[2]} | {cell(v)} |")
        lines.append("")
    (args.out / "results.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
