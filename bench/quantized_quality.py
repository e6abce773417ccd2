"""What calibrated quantization buys: GPTQ (`convert --quantize`) against rounding to nearest (RTN), int8 and
4-bit, on MiniLM's FFNs dense and at half their non-zeros (issue 31's quality table).

Every variant quantizes the same matrices (the six FFN pairs; attention stays fp32 here, so the numbers isolate
the FFN weights' rounding): RTN is applied in this process to the fp32 weights GPTQ starts from: the original for
"dense" (`convert --alpha 1 --budget same --no-reconstruct --calibration TREC --quantize …`, which leaves the
weights as they are and only quantizes them), the calibrated half-budget conversion for "half" (its fp32 output,
`convert --alpha 1 --budget 0.5 --calibration TREC`; the quantized ones add `--quantize …`). Calibration: TREC
training questions (the first ~16k tokens, convert's default). Scored: cosine of mean-pooled embeddings to the
original's on TREC test questions (the calibration's domain, unseen sentences) and SST-5 test sentences (another
domain).

  python bench/quantized_quality.py [--eval 300 --out bench/results/quantized/quality]
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

from fpewiden.data.embeddings import minilm_dir, sentence_embeddings, task_sentences
from fpewiden.io.provenance import MD_MARKER
from fpewiden.quantize import BITS, Grid, round_to_nearest

GRIDS = {"int8": ("int8", None), "int4 g32": ("int4", 32), "int4 g128": ("int4", 128)}


def fpewiden(*args: object) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fpewiden", *map(str, args)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


@torch.no_grad()
def embeddings(folder: Path, texts: list[str], rtn: tuple[str, int | None] | None = None) -> torch.Tensor:
    """Normalised mean-pooled embeddings; `rtn`: the FFN matrices rounded to nearest on that grid first."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    if rtn is not None:
        grid = Grid(BITS[rtn[0]], rtn[1])
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and (name.endswith("intermediate.dense") or ".output.dense" in name):
                if ".attention." not in name:
                    mod.weight.copy_(round_to_nearest(mod.weight, grid)[0])
    return sentence_embeddings(model, tok, texts, batch=64)


def eval_texts(n: int) -> dict[str, list[str]]:
    """The unseen sentences scored: TREC test questions (the calibration's domain) and SST-5 test sentences."""
    return {
        "TREC (in domain)": task_sentences("trec6", "test")[0][:n],
        "SST-5 (other domain)": task_sentences("sst5", "test")[0][:n],
    }


def calibration_file(work: Path) -> Path:
    """TREC's training questions, one per line: what every quantized MiniLM here is calibrated on."""
    cal = work / "trec-train.txt"
    cal.write_text("\n".join(task_sentences("trec6", "train")[0]) + "\n")
    return cal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=300, help="test sentences scored per domain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantized/quality"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    src = minilm_dir()
    texts = eval_texts(args.eval)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cal = calibration_file(work)
        ref = {k: embeddings(src, t) for k, t in texts.items()}

        def score(label: str, folder: Path, method: str, grid: str, seconds: float | None, rtn=None) -> None:
            cos = {k: float((embeddings(folder, t, rtn) * ref[k]).sum(1).mean()) for k, t in texts.items()}
            rows.append({"model": label, "method": method, "grid": grid, "cosine": cos, "convert_s": seconds})
            print(json.dumps(rows[-1]), flush=True)

        dense = ("--alpha", 1, "--budget", "same", "--no-reconstruct", "--calibration", cal)
        half_args = ("--alpha", 1, "--budget", "0.5", "--calibration", cal)
        half = work / "half"
        score("half", half, "fp32", "fp32", fpewiden("convert", src, "--out", half, *half_args))
        for base, folder, conv in (("dense", src, dense), ("half", half, half_args)):
            for grid, (bits, group) in GRIDS.items():
                if base == "half" and grid == "int4 g128":
                    continue
                score(base, folder, "round to nearest", grid, None, (bits, group))
                out = work / f"{base}-{grid.replace(' ', '-')}"
                flags = ("--quantize", bits, *(("--group-size", group) if group else ()))
                seconds = fpewiden("convert", src, "--out", out, *conv, *flags)
                score(base, out, "GPTQ", grid, seconds)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    (args.out / "quality.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1) + "\n")
    domains = list(texts)
    lines = [
        "# Calibrated quantization (GPTQ) against rounding to nearest: MiniLM's FFN weights",
        "",
        f"`{command}` ({args.threads} threads)",
        "",
        "Cosine of mean-pooled embeddings to the original MiniLM's, on test sentences never calibrated on. Only the "
        "six FFN pairs are quantized (attention fp32), so each row isolates their rounding. dense: the original "
        "weights; half: calibrated pruning to half the FFN non-zeros (its fp32 row first). int8: one scale per "
        "output row; int4 gN: one scale per N inputs of a row. Calibration: TREC training questions.",
        "",
        f"| FFN weights | values | method | {' | '.join(domains)} | convert s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['cosine'][k]:.4f}" for k in domains)
        secs = f"{r['convert_s']:.0f}" if r["convert_s"] is not None else "–"
        lines.append(f"| {r['model']} | {r['grid']} | {r['method']} | {cells} | {secs} |")
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
