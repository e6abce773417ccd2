"""The deployable quantized MiniLM files: what `convert --quantize … --packed` writes, every Linear and the
embedding table quantized, scored as a user runs them (`fpewiden.packed.load`, int8 inputs where VNNI runs).

Rows: the FFNs GPTQ-quantized on TREC training questions (`convert --alpha 1 --budget same --no-reconstruct
--calibration TREC --quantize int8|int4 --packed`; attention rounded to nearest by pack, the embedding table
int8), and the same files from the original by `pack --dtype int8|int4` alone (round to nearest everywhere).
Cosine of mean-pooled embeddings to the original's on unseen TREC test questions and SST-5 test sentences, and
the folders' weight bytes on disk.

  python bench/quantized_files.py [--eval 300 --out bench/results/quantized/files]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantized_quality import calibration_file, embeddings, eval_texts  # as the quality table scores them

from fpewiden.benchmark.machine import cpu_name
from fpewiden.data.embeddings import minilm_dir, sentence_embeddings
from fpewiden.io.provenance import MD_MARKER


def fpewiden(*args: object) -> None:
    subprocess.run([sys.executable, "-m", "fpewiden", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / 1e6


@torch.no_grad()
def packed_embeddings(folder: Path, texts: list[str]) -> torch.Tensor:
    import transformers

    from fpewiden.packed import load

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = load(folder, tune=False)
    return sentence_embeddings(model, tok, texts, batch=64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantized/files"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    src = minilm_dir()
    texts = eval_texts(args.eval)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cal = calibration_file(work)
        ref = {k: embeddings(src, t) for k, t in texts.items()}
        gptq = ("--alpha", 1, "--budget", "same", "--no-reconstruct", "--calibration", cal, "--packed")
        for bits in ("int8", "int4"):
            made = {
                f"GPTQ FFNs, {bits}": (work / f"gptq-{bits}", ("convert", src, *gptq, "--quantize", bits)),
                f"round to nearest, {bits}": (work / f"rtn-{bits}", ("pack", src, "--dtype", bits)),
            }
            for label, (out, cmd) in made.items():
                fpewiden(*cmd, "--out", out)
                cos = {k: float((packed_embeddings(out, t) * ref[k]).sum(1).mean()) for k, t in texts.items()}
                rows.append({"file": label, "cosine": cos, "mb": folder_mb(out)})
                print(json.dumps(rows[-1]), flush=True)
        original_mb = folder_mb(src)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    (args.out / "files.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    cpu = cpu_name()
    domains = list(texts)
    lines = [
        "# MiniLM's deployable quantized files: GPTQ (convert --quantize --packed) against pack's rounding",
        "",
        f"`{command}` (CPU: {cpu}; run as fpewiden.packed.load runs them, int8 inputs where VNNI runs)",
        "",
        f"Cosine of mean-pooled embeddings to the original's (weights {original_mb:.1f} MB). Every Linear and the "
        "embedding table quantized (int4: groups of 32; the table int8); GPTQ compensates the FFNs only, "
        "attention is rounded to nearest in both rows.",
        "",
        f"| file | {' | '.join(domains)} | MB on disk |",
        "|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['cosine'][k]:.4f}" for k in domains)
        lines.append(f"| {r['file']} | {cells} | {r['mb']:.1f} |")
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
