"""Which widened structure keeps FPE's gain at the original's bytes and speed?

Accuracy at equal non-zeros (the paper's protocol through `fpewiden run`, α=2, budget same, 3 seeds) on the main
job's task, the 8-clause paper task, TREC-50 over MiniLM embeddings at widths 4 and 8, and digits; next to the
weight bytes of each structure's best exact format and its ONNX Runtime latency at batch 1 and 32, measured by
`fpewiden bench` on an MLP 1024→4096→1024 converted the same way (2 threads, round-robin; weights are fresh, since
latency and bytes do not depend on training). "Gain kept" = (structure − dense) / (per-neuron FPE − dense).

  python bench/structures.py [--seeds 0,1,2 --repeat 200 --out bench/results/structures --part all|accuracy|speed]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fpewiden.io.provenance import MD_MARKER, json_document
from fpewiden.model.chain_mlp import ChainMLP
from fpewiden.recipes import Conversion, ModelSpec, Recipe
from fpewiden.run import run_recipe

STRUCTURES = {
    "FPE per-neuron (paper)": {"split": "random"},
    "shared split, copied outgoing": {"split": "shared"},
    "shared split, grouped outgoing": {"split": "shared", "outgoing": "grouped"},
    "shared split, tied outgoing": {"split": "shared", "outgoing": "tied"},
    "grouped:4 split, tied outgoing": {"split": "grouped:4", "outgoing": "tied"},
    "per-neuron split, tied outgoing": {"split": "random", "outgoing": "tied"},
}
TASKS = {
    "main job (16 clauses, 8 neurons)": ("dnf:inputs=32,clauses=16,literals=3,outputs=clauses,n=8000", 8, 1e-2),
    "paper 8-clause OR (8 neurons)": ("dnf:inputs=64,clauses=8,literals=4,outputs=or,n=8000", 8, 1e-2),
    "TREC-50, width 4": ("embed:trec50", 4, 3e-3),
    "TREC-50, width 8": ("embed:trec50", 8, 3e-3),
    "digits (16 neurons)": ("digits", 16, 1e-2),
}


def accuracy(seeds: list[int], work: Path) -> dict:
    out = {}
    for task, (data, width, lr) in TASKS.items():
        conversions = [Conversion(alpha=2, **kw) for kw in STRUCTURES.values()]
        recipe = Recipe(
            name=task,
            data=data,
            model=ModelSpec(hidden=[width]),
            epochs=30,
            warmup_epochs=5,
            conversions=conversions,
            seeds=seeds,
            lr=lr,
            bench_repeat=0,
        )
        result = run_recipe(recipe, work / f"run{len(out)}")
        metric = "exact_match" if "clauses,n" in data else "accuracy"
        by_label = {s["model"]: s for s in result["summary"]}
        labels = ["dense", *[c.label for c in conversions]]
        out[task] = {
            name: {
                "mean": by_label[lab][metric]["mean"],
                "std": by_label[lab][metric]["std"],
                "nnz": by_label[lab]["nnz"],
                "metric": metric,
            }
            for name, lab in zip(["dense", *STRUCTURES], labels, strict=True)
        }
        print(task, json.dumps({k: round(v["mean"], 4) for k, v in out[task].items()}), flush=True)
    return out


def speed(repeat: int, work: Path) -> dict:
    """bytes and ORT latency of each structure on a 1024→4096→1024 MLP, by `fpewiden bench`."""
    src = work / "big.safetensors"
    save_file(
        ChainMLP.fresh([1024, 4096, 1024], "gelu", seed=0).tensors(),
        str(src),
        metadata={"fpewiden.version": "bench", "fpewiden.activation": "gelu"},
    )
    g = torch.Generator().manual_seed(0)
    save_file(
        {"x": torch.randn(256, 1024, generator=g), "y": torch.randint(0, 1024, (256,), generator=g)},
        str(work / "data.safetensors"),
    )
    paths = [src]
    for i, kw in enumerate(STRUCTURES.values()):
        dst = work / f"s{i}.safetensors"
        flags = ["--split", kw["split"]] + (["--outgoing", kw["outgoing"]] if "outgoing" in kw else [])
        subprocess.run(
            [
                sys.executable,
                "-m",
                "fpewiden",
                "convert",
                str(src),
                "--out",
                str(dst),
                "--alpha",
                "2",
                "--activation",
                "gelu",
                *flags,
            ],
            check=True,
            capture_output=True,
        )
        paths.append(dst)
    out = work / "speed.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpewiden",
            "bench",
            *map(str, paths),
            "--data",
            str(work / "data.safetensors"),
            "--engines",
            "ort",
            "--batch-sizes",
            "1,32",
            "--threads",
            "2",
            "--repeat",
            str(repeat),
            "--warmup",
            "20",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    rows = json.loads(out.read_text())["benchmarks"]
    return {
        name: {
            "best_format": r["best_format"],
            "best_bytes": r["best_bytes"],
            "ort_layout": r.get("ort_layout"),
            "bytes_vs_dense": r["best_bytes"] / rows[0]["best_bytes"],
            "latency_vs_dense": r["latency_vs_reference"]["ort"],
            "median_ms": {b: v["median_ms"] for b, v in r["latency"]["ort"].items()},
        }
        for name, r in zip(["dense", *STRUCTURES], rows, strict=True)
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("bench/results/structures"))
    ap.add_argument(
        "--part",
        choices=["all", "accuracy", "speed", "table"],
        default="all",
        help="measure one part only, or none (table): parts are kept in --out, the table written once both are there",
    )
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for part in ("speed", "accuracy"):
            saved = args.out / f"{part}.json"
            if args.part in ("all", part):
                t0 = time.perf_counter()
                value = (
                    speed(args.repeat, work)
                    if part == "speed"
                    else accuracy([int(s) for s in args.seeds.split(",")], work)
                )
                command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
                doc = {"command": command, "seconds": time.perf_counter() - t0, part: value}
                saved.write_text(json.dumps(json_document(doc), indent=2) + "\n")
            if saved.is_file():
                parts[part] = json.loads(saved.read_text())
    if len(parts) < 2:
        return
    accs, speeds = parts["accuracy"]["accuracy"], parts["speed"]["speed"]
    doc = {
        "command": " ; ".join(sorted({p["command"] for p in parts.values()})),
        "seconds": sum(p["seconds"] for p in parts.values()),
    }
    lines = [
        "# Widened structures at equal non-zeros: accuracy, bytes, speed",
        "",
        f"`{doc['command']}` ({doc['seconds'] / 60:.0f} min on 2 CPU cores). α=2, budget same, 3 seeds, mean ± std; "
        "gain kept = (structure − dense) / (per-neuron FPE − dense).",
        "",
        "| structure | " + " | ".join(TASKS) + " | best format | bytes vs dense | ORT b1 vs dense | ORT b32 vs dense |",
        "|---|" + "---|" * (len(TASKS) + 4),
    ]
    for name in ["dense", *STRUCTURES]:
        cells = []
        for task in TASKS:
            a = accs[task]
            gain = a["FPE per-neuron (paper)"]["mean"] - a["dense"]["mean"]
            kept = (a[name]["mean"] - a["dense"]["mean"]) / gain if gain > 0 else float("nan")
            kept_text = "" if name == "dense" else (f" ({kept:.0%})" if gain > 0 else " (no gain to keep)")
            cells.append(f"{a[name]['mean']:.3f} ± {a[name]['std']:.3f}{kept_text}")
        s = speeds[name]
        cells += [
            s["best_format"],
            f"{s['bytes_vs_dense']:.2f}×",
            f"{s['latency_vs_dense']['1']:.2f}×",
            f"{s['latency_vs_dense']['32']:.2f}×",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
