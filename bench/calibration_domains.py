"""Does a calibrated conversion carry over to text it was not calibrated on? MiniLM, in-domain and cross-domain.

Each variant converts MiniLM's six FFNs at one budget (no fine-tuning), calibrated on the training sentences of
one corpus (TREC questions or SST-5 movie-review sentences), and is scored on the test sentences of both: the
cosine of mean-pooled embeddings to the original's. The uncalibrated conversions (magnitude pruning, the
paper's FPE) need no calibration and are scored once. Variants (`--variants`, comma-separated):

  magnitude        α=1, no calibration (magnitude pruning)
  fpe              α=2, the paper's recipe (random split, magnitude pruning, no calibration)
  cal-prune        α=1, calibrated: activation importance, least-squares refit (SparseGPT-like)
  fpe-cal          α=2, calibrated, every neuron widened, refit at the fixed ridge 1e-3 (the old default)
  fpe-cal-r0.1 / fpe-cal-r10          the same at ridge 0.1 / 10 (relative to the Gram's mean diagonal)
  fpe-cal-no-in    no incoming refit (the children keep their pruned weights), outgoing refit only
  fpe-cal-no-out   incoming refit only
  fpe-cal-none     no refit at all (saliency-chosen weights as they are)
  fpe-cal-64k      ridge 1e-3 on 64k calibration tokens instead of 16k
  fpe-cal-auto / cal-prune-auto       ridge chosen per refit on held-out calibration tokens (exact solver)
  fpe-cal-cg / cal-prune-cg           conjugate gradients to the exact refit (ridge chosen the same way)
  fpe-cal-obs / cal-prune-obs         SparseGPT's update for the given mask (ridge chosen the same way)
  fpe-cal-default / cal-prune-default convert's default (solver auto: exact where affordable, else cg)

  python bench/calibration_domains.py [--budget 0.5 --variants ... --out bench/results/calibration_domains]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from fpewiden.convert import Budget, Calibration, ConvertOptions, convert
from fpewiden.data.embeddings import minilm_dir, task_sentences
from fpewiden.io.provenance import MD_MARKER, json_document

sys.path.insert(0, str(Path(__file__).parent))
from calibration import embeddings

CORPORA = {"TREC": "trec6", "SST-5": "sst5"}
FIXED = 1e-3  # the ridge every calibrated conversion used before it was chosen on held-out data
VARIANTS: dict[str, tuple[int, dict | None]] = {  # name -> (α, Calibration fields; None: uncalibrated)
    "magnitude": (1, None),
    "fpe": (2, None),
    "cal-prune": (1, {"ridge": FIXED}),
    "fpe-cal": (2, {"ridge": FIXED}),
    "fpe-cal-r0.1": (2, {"ridge": 0.1}),
    "fpe-cal-r10": (2, {"ridge": 10.0}),
    "fpe-cal-no-in": (2, {"ridge": FIXED, "refit_incoming": False}),
    "fpe-cal-no-out": (2, {"ridge": FIXED, "refit_outgoing": False}),
    "fpe-cal-none": (2, {"reconstruct": False}),
    "fpe-cal-64k": (2, {"ridge": FIXED, "samples": {"TREC": 5452, "SST-5": 2600}}),  # sentences: ~55k / ~64k tokens
    "fpe-cal-auto": (2, {"solver": "exact"}),  # ridge chosen on held-out tokens (exact solver)
    "cal-prune-auto": (1, {"solver": "exact"}),
    "fpe-cal-cg": (2, {"solver": "cg"}),  # the scalable refits (bench/calibration_solver.py)
    "cal-prune-cg": (1, {"solver": "cg"}),
    "fpe-cal-obs": (2, {"solver": "obs"}),
    "cal-prune-obs": (1, {"solver": "obs"}),
    "fpe-cal-default": (2, {}),
    "cal-prune-default": (1, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="0.5")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--eval", type=int, default=1000, help="test sentences per corpus (first N)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/calibration_domains"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = minilm_dir()
    tests = {name: task_sentences(task, "test")[0][: args.eval] for name, task in CORPORA.items()}
    reference = {name: embeddings(src, src, texts) for name, texts in tests.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    done = args.out / "rows.jsonl"  # one line per finished conversion: a killed run resumes where it stopped
    rows = [json.loads(line) for line in done.read_text().splitlines()] if done.is_file() else []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cal_files = {}
        for name, task in CORPORA.items():
            cal_files[name] = work / f"{name}.txt"
            cal_files[name].write_text("\n".join(task_sentences(task, "train")[0]) + "\n")
        for variant in args.variants.split(","):
            alpha, fields = VARIANTS[variant]
            for corpus in CORPORA if fields is not None else [None]:
                if any(r["variant"] == variant and r["calibrated_on"] == corpus for r in rows):
                    continue
                if fields is not None and isinstance(fields.get("samples"), dict):
                    fields = {**fields, "samples": fields["samples"][corpus]}
                cal = Calibration(data=str(cal_files[corpus]), **fields) if fields is not None else None
                dst = work / f"{variant}-{corpus}"
                t = time.perf_counter()
                convert(src, dst, ConvertOptions(alpha=alpha, budget=Budget.parse(args.budget), calibration=cal))
                seconds = time.perf_counter() - t
                row = {"variant": variant, "calibrated_on": corpus, "budget": args.budget, "seconds": seconds}
                for name, texts in tests.items():
                    emb = embeddings(dst, src, texts)
                    row[name] = float(torch.nn.functional.cosine_similarity(emb, reference[name]).mean())
                if cal is not None:
                    from fpewiden.io.checkpoint import open_checkpoint

                    meta = open_checkpoint(dst).meta.calibration or {}
                    row["layers"] = meta.get("layers")
                rows.append(row)
                with done.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps({k: v for k, v in row.items() if k != "layers"}), flush=True)
                import shutil

                shutil.rmtree(dst)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    (args.out / "results.json").write_text(json.dumps(json_document({"command": command, "rows": rows}), indent=2))
    lines = [
        "# Calibrated conversion in and out of its domain: MiniLM (all-MiniLM-L6-v2)",
        "",
        f"`{command}`",
        "",
        f"Budget {args.budget} of the FFN non-zeros, no fine-tuning. Cosine of mean-pooled embeddings to the "
        f"original's on the first {args.eval} test sentences of each corpus; calibration on the training sentences "
        "of one corpus (16k tokens unless named). In-domain: scored on the corpus calibrated on; cross-domain: on "
        "the other.",
        "",
        "| variant | calibrated on | TREC test | SST-5 test | in-domain | cross-domain | convert s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        corpus = r["calibrated_on"]
        other = next((c for c in CORPORA if c != corpus), None)
        ind = f"{r[corpus]:.4f}" if corpus else "-"
        cross = f"{r[other]:.4f}" if corpus else "-"
        lines.append(
            f"| {r['variant']} | {corpus or '(none)'} | {r['TREC']:.4f} | {r['SST-5']:.4f} | {ind} | {cross} | "
            f"{r['seconds']:.0f} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
