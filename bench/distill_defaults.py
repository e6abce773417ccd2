"""Does `fpewiden finetune --teacher` with its default settings improve a MiniLM student?

MiniLM's FFNs are converted (FPE α=2, random split, budget `same` and 0.5), then distilled against the original
for one epoch on TREC training questions through the `fpewiden finetune` command, once with the distillation
defaults (lr 1e-4, batch 32) and once with the MLP defaults fpewiden used before (lr 1e-3, batch 128). Reported:
the held-out cosine to the teacher (10% of the questions, the trainer's own split) before and after.

  python bench/distill_defaults.py [--sentences 3000 --out bench/results/distill_defaults]
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

from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.data.embeddings import minilm_dir, task_sentences
from fpewiden.io.provenance import MD_MARKER, json_document

SETTINGS = {
    "defaults (lr 1e-4, batch 32)": [],
    "old MLP defaults (lr 1e-3, batch 128)": ["--lr", "1e-3", "--batch-size", "128"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=3000)
    ap.add_argument("--budgets", default="same,0.5")
    ap.add_argument("--out", type=Path, default=Path("bench/results/distill_defaults"))
    args = ap.parse_args()
    texts, _ = task_sentences("trec6", "train")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        text = work / "trec.txt"
        text.write_text("\n".join(texts[: args.sentences]) + "\n")
        for budget in args.budgets.split(","):
            student = work / f"fpe_{budget}"
            convert(minilm_dir(), student, ConvertOptions(alpha=2, budget=Budget.parse(budget)))
            for label, flags in SETTINGS.items():
                out = work / f"ft_{budget}_{len(rows)}"
                cmd = [
                    sys.executable,
                    "-m",
                    "fpewiden",
                    "finetune",
                    str(student),
                    "--teacher",
                    str(minilm_dir()),
                    "--data",
                    str(text),
                    "--out",
                    str(out),
                    "--epochs",
                    "1",
                    *flags,
                ]
                t = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                log = json.loads((work / f"{out.name}.log.json").read_text())
                rows.append(
                    {
                        "student": f"FPE α=2 random, budget {budget}",
                        "settings": label,
                        "cosine_before": log["before"]["cosine"],
                        "cosine_after": log["final"]["cosine"],
                        "threads": log["threads"],
                        "seconds": time.perf_counter() - t,
                    }
                )
                print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    (args.out / "results.json").write_text(json.dumps(json_document({"command": command, "rows": rows}), indent=2))
    lines = [
        "# Distillation defaults on MiniLM",
        "",
        f"`{command}` — one epoch over {args.sentences} TREC training questions; held-out cosine to the teacher "
        "(the trainer's 10% split).",
        "",
        "| student | settings | cosine before | cosine after | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['student']} | {r['settings']} | {r['cosine_before']:.4f} | {r['cosine_after']:.4f} | "
            f"{r['seconds']:.0f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
