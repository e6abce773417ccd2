"""A real transformer, which the paper did not try: MiniLM's FFNs widened at α=2, distilled, probed on TREC.

For budget `same` and 0.5: FPE α=2 (random split) and, at 0.5, magnitude pruning of the same FFN matrices; each
is distilled against the original encoder on TREC training questions (mean-pooled embeddings, MSE), then
measured by cosine similarity of its embeddings to the original's on the TREC test questions and by the
accuracy of a logistic-regression probe (TREC-6) trained on its embeddings. The original encoder is the reference.

  python bench/paper_minilm.py [--sentences 3000 --epochs 1 --lr 1e-4 --out bench/results/paper_minilm]

Each distilled row also keeps its per-epoch history (MSE and cosine on the 10% of the distillation sentences held
out by the trainer), so a longer run shows whether a model is still improving or has levelled off.
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
from fpewiden.data.embeddings import minilm_dir, sentence_embeddings, task_sentences
from fpewiden.train.config import TrainConfig
from fpewiden.train.finetune import finetune


@torch.no_grad()
def embed_with(model_dir: Path, texts: list[str]) -> torch.Tensor:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    model = transformers.AutoModel.from_pretrained(str(model_dir)).eval()
    return sentence_embeddings(model, tok, texts, batch=128, max_length=64)


def probe(x: torch.Tensor, y: list[str], xt: torch.Tensor, yt: list[str]) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=10.0).fit(x.numpy(), y)
    return float(clf.score(xt.numpy(), yt))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sentences", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument(
        "--models",
        default="fpe-same,fpe-0.5,magnitude-0.5",
        help="comma-separated, of: fpe-same, fpe-0.5, magnitude-0.5, cal-pruning-0.5, fpe-cal-0.5, sel0.05-0.5, "
        "shared-tied-same",
    )
    ap.add_argument("--n", type=int, default=0, help="first N training and N/4 test questions only (quick checks)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/paper_minilm"))
    args = ap.parse_args()
    train_texts, train_labels = task_sentences("trec6", "train")
    test_texts, test_labels = task_sentences("trec6", "test")
    if args.n:
        train_texts, train_labels = train_texts[: args.n], train_labels[: args.n]
        test_texts, test_labels = test_texts[: args.n // 4], test_labels[: args.n // 4]
    original = minilm_dir()
    ref_train, ref_test = embed_with(original, train_texts), embed_with(original, test_texts)
    rows = [
        {
            "model": "original MiniLM",
            "ffn_nnz": None,
            "cosine": 1.0,
            "probe_accuracy": probe(ref_train, train_labels, ref_test, test_labels),
            "distill_s": 0.0,
            "history": [],
        }
    ]
    known = {
        "fpe-same": ("FPE α=2, budget same", 2, "same", None),
        "fpe-0.5": ("FPE α=2, budget 0.5", 2, "0.5", None),
        "magnitude-0.5": ("magnitude pruning, budget 0.5", 1, "0.5", None),
        "cal-pruning-0.5": ("calibrated pruning (α=1), budget 0.5", 1, "0.5", {}),
        "fpe-cal-0.5": ("FPE α=2 calibrated, every neuron widened, budget 0.5", 2, "0.5", {"select": "all"}),
        "sel0.05-0.5": (
            "FPE α=2 calibrated, 5% of neurons widened, budget 0.5",
            2,
            "0.5",
            {"select": "wasserstein", "fraction": 0.05},
        ),
        "shared-tied-same": (
            "FPE α=2, shared split, tied outgoing (the original's bytes), budget same",
            2,
            "same",
            None,
        ),
    }
    structure = {"shared-tied-same": {"split": "shared", "outgoing": "tied"}}
    chosen = args.models.split(",")
    if any(m not in known for m in chosen):
        raise SystemExit(f"--models: choose from {', '.join(known)}")
    configs = [(*known[m], structure.get(m, {})) for m in chosen]
    with tempfile.TemporaryDirectory() as d:
        text = Path(d) / "train.txt"
        text.write_text("\n".join(train_texts[: args.sentences]))
        for n, (label, alpha, budget, cal, layout) in enumerate(configs):
            conv, ft = Path(d) / f"{n}_{alpha}_{budget}", Path(d) / f"{n}_{alpha}_{budget}_ft"
            calibration = Calibration(data=str(text), **cal) if cal is not None else None
            opts = ConvertOptions(alpha=alpha, budget=Budget.parse(budget), calibration=calibration, **layout)
            report = convert(original, conv, opts)
            for stage, model_dir in (("converted", conv), ("distilled", ft)):
                if stage == "distilled":
                    t = time.perf_counter()
                    summary = finetune(
                        conv,
                        str(text),
                        ft,
                        TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=32, device="cpu"),
                        teacher=original,
                    )
                    seconds = time.perf_counter() - t
                x, xt = embed_with(model_dir, train_texts), embed_with(model_dir, test_texts)
                rows.append(
                    {
                        "model": f"{label} ({stage})",
                        "ffn_nnz": report["nnz_after"],
                        "cosine": float((xt * ref_test).sum(1).mean()),
                        "probe_accuracy": probe(x, train_labels, xt, test_labels),
                        "distill_s": seconds if stage == "distilled" else 0.0,
                        "history": summary["history"] if stage == "distilled" else [],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"command": "python " + shlex.join(sys.argv), "rows": rows}, indent=2)
    )
    lines = [
        "# MiniLM FFNs: FPE vs pruning, distilled",
        "",
        f"`{' '.join(sys.argv)}` — TREC test questions; probe: logistic regression on TREC-6 train embeddings",
        "",
        "| model | FFN non-zeros | cosine to original | TREC-6 probe accuracy | distillation s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ffn_nnz'] or '7077888 (dense)'} | {r['cosine']:.4f} | "
            f"{r['probe_accuracy']:.4f} | {r['distill_s']:.0f} |"
        )
    curves = [r for r in rows if r["history"]]
    if curves:
        epochs = max(len(r["history"]) for r in curves)
        lines += [
            "",
            "Held-out distillation cosine (10% of the distillation sentences) before training and after each epoch:",
            "",
            "| model | " + " | ".join("before" if e == 0 else f"epoch {e}" for e in range(epochs)) + " |",
            "|---|" + "---|" * epochs,
        ]
        for r in curves:
            lines.append(f"| {r['model']} | " + " | ".join(f"{h['cosine']:.4f}" for h in r["history"]) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
