"""Calibrated conversion on a pretrained transformer: FPE against the pruning a user would pick instead.

MiniLM's six FFNs (or a tiny Llama, `--model`), converted by `fpewiden convert` in one process per model, no
fine-tuning. Calibration: TREC training questions (the first `--calibration-samples`, default: a few thousand
tokens). Reported per model: cosine similarity of the mean-pooled last hidden state to the original's on the
500 TREC test questions and on the 2210 SST-5 test sentences (another distribution), the FFN non-zeros, and the
convert's wall time and peak RSS (its own process). Models (each at every `--budgets` entry where it applies):

  magnitude         α=1, no calibration (magnitude pruning; at budget `same` it is the original)
  act               α=1, calibrated, activation importance, no refit (Wanda-like: |W|·‖input‖)
  act+refit         α=1, calibrated, activation importance, least-squares refit (SparseGPT-like)
  fpe               α=2, the paper's recipe (random split, magnitude pruning, no calibration)
  fpe-cal           α=2, calibrated, every neuron widened, activation importance, refit
  fpe-cal-act       the same with the data-aware split (--split activation)
  fpe-cal-mag       α=2, calibrated, every neuron widened, magnitude importance, refit
  sel-F             α=2, calibrated, the share F of neurons farthest from Gaussian widened (F in --fractions)

  python bench/calibration.py [--budgets 0.5,same --fractions 0,0.05,0.1,0.25,0.5 --out bench/results/calibration]
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

from fpewiden.data.embeddings import minilm_dir, task_sentences
from fpewiden.io.provenance import MD_MARKER, json_document
from fpewiden.model.pooling import mean_pool

CHILD = """
import resource, sys
from fpewiden.cli import app
try:
    app(sys.argv[2:], standalone_mode=True)
finally:
    with open(sys.argv[1], "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
"""

MODELS = {
    "magnitude": ["--alpha", "1"],
    "act": ["--alpha", "1", "--cal", "--no-reconstruct"],
    "act+refit": ["--alpha", "1", "--cal"],
    "fpe": ["--alpha", "2"],
    "fpe-cal": ["--alpha", "2", "--cal", "--select", "all"],
    "fpe-cal-act": ["--alpha", "2", "--cal", "--select", "all", "--split", "activation"],
    "fpe-cal-mag": ["--alpha", "2", "--cal", "--select", "all", "--importance", "magnitude"],
}


def sentences(task: str, split: str) -> list[str]:
    return task_sentences("trec6" if task == "trec" else task, split)[0]


@torch.no_grad()
def embeddings(model_dir: Path, tokenizer_dir: Path, texts: list[str]) -> torch.Tensor:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = transformers.AutoModel.from_pretrained(str(model_dir)).float().eval()
    out = []
    for i in range(0, len(texts), 128):
        enc = tok(texts[i : i + 128], padding=True, truncation=True, max_length=64, return_tensors="pt")
        enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if "token_type_ids" in enc and "token_type_ids" not in model.forward.__code__.co_varnames:
            enc.pop("token_type_ids")
        out.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]))
    return torch.cat(out)


def convert(src: Path, dst: Path, flags: list[str], budget: str, cal: Path, samples: int | None) -> dict:
    args = [a for a in flags if a != "--cal"]
    if "--cal" in flags:
        args += ["--calibration", str(cal)] + (["--calibration-samples", str(samples)] if samples else [])
    peak = dst.parent / f"{dst.name}.rss"
    cmd = [sys.executable, "-c", CHILD, str(peak), "convert", str(src), "--out", str(dst), "--budget", budget, *args]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": int(peak.read_text()) / 1024, "flags": flags}


def ffn_nnz(path: Path) -> int:
    from fpewiden.inspect import inspect_checkpoint

    return inspect_checkpoint(path)["totals"]["nnz"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="a Hugging Face folder (default: MiniLM)")
    ap.add_argument("--budgets", default="0.5,same")
    ap.add_argument("--models", default="magnitude,act,act+refit,fpe,fpe-cal", help=f"of {', '.join(MODELS)}")
    ap.add_argument("--fractions", default="0,0.05,0.1,0.25,0.5")
    ap.add_argument("--calibration-samples", type=int, default=None)
    ap.add_argument("--eval", type=int, default=0, help="first N evaluation sentences only (quick checks)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/calibration"))
    args = ap.parse_args()
    src = args.model or minilm_dir()
    tok_dir = src if (src / "tokenizer.json").is_file() or (src / "tokenizer_config.json").is_file() else minilm_dir()
    torch.set_num_threads(2)
    evals = {"TREC test": sentences("trec", "test"), "SST-5 test": sentences("sst5", "test")}
    if args.eval:
        evals = {k: v[: args.eval] for k, v in evals.items()}
    reference = {k: embeddings(src, tok_dir, v) for k, v in evals.items()}
    models = dict(MODELS)
    models = {m: models[m] for m in args.models.split(",") if m in models}
    for f in args.fractions.split(","):
        if f:
            models[f"sel-{f}"] = ["--alpha", "2", "--cal", "--select", "wasserstein", "--expand-fraction", f]
    args.out.mkdir(parents=True, exist_ok=True)
    done = args.out / "rows.jsonl"  # one line per finished model: a killed run resumes where it stopped
    rows = [json.loads(line) for line in done.read_text().splitlines()] if done.is_file() else []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cal = work / "calibration.txt"
        cal.write_text("\n".join(sentences("trec", "train")) + "\n")
        for budget in args.budgets.split(","):
            for name, flags in models.items():
                if budget == "same" and name in ("magnitude", "act", "act+refit", "sel-0"):
                    continue  # at the original count these change nothing: the original itself
                if any(r["model"] == name and r["budget"] == budget for r in rows):
                    continue
                dst = work / f"{name}_{budget}"
                info = convert(src, dst, flags, budget, cal, args.calibration_samples)
                row = {"model": name, "budget": budget, "ffn_nnz": ffn_nnz(dst), **info}
                for label, texts in evals.items():
                    emb = embeddings(dst, tok_dir, texts)
                    row[label] = float(torch.nn.functional.cosine_similarity(emb, reference[label]).mean())
                from fpewiden.io.checkpoint import open_checkpoint

                cal_meta = open_checkpoint(dst).meta.calibration
                if cal_meta:
                    row["calibration"] = cal_meta
                rows.append(row)
                with done.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k != "calibration"}), flush=True)
                import shutil

                shutil.rmtree(dst)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    (args.out / "results.json").write_text(json.dumps(json_document({"command": command, "rows": rows}), indent=2))
    lines = [
        f"# Calibrated conversion: {src.name if args.model else 'MiniLM (all-MiniLM-L6-v2)'}",
        "",
        f"`{command}`",
        "",
        "Cosine similarity of mean-pooled embeddings to the original, before any fine-tuning; convert time and "
        "peak RSS of the convert process (2 threads).",
        "",
        "| model | budget | FFN non-zeros | TREC test | SST-5 test | convert s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['budget']} | {r['ffn_nnz']:,} | {r['TREC test']:.4f} | {r['SST-5 test']:.4f} | "
            f"{r['seconds']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
