"""`fpewiden bench` on Hugging Face models, as the README describes it: prepare the models, then one bench run.

MiniLM (default): the original; magnitude pruning at half the FFN non-zeros; calibrated pruning (α=1, activation
importance, refit) at half; FPE α=2 at `same` and at 0.5 (the paper's recipe), calibrated FPE α=2 at 0.5; and the
shared-split FPE α=2 with grouped and with tied outgoing weights (structures `export --layout fast` runs at the
original's bytes). ONNX exports: dense for the
original (the folders themselves are exported dense by bench for ONNX Runtime, fast where the structure allows);
sparse for magnitude pruning and FPE α=2 same; fast for the shared/grouped and shared/tied models. Accuracy:
TREC-6 probe (trained on the original's embeddings of TREC training questions) and cosine on the TREC test
questions. `--causal`: a tiny Llama (bench/tiny_llama.py) with magnitude pruning, calibrated pruning and FPE,
measured by perplexity and next-token agreement on the TREC test questions.

  python bench/hf_bench.py [--repeat 20 --out bench/results/hf_bench]
  python bench/hf_bench.py --causal --out bench/results/hf_bench_llama
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fpewiden.data.embeddings import cache_dir, minilm_dir, task_sentences


def fpewiden(*args: str) -> None:
    cmd = [sys.executable, "-m", "fpewiden", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{shlex.join(cmd)}\n{res.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results/hf_bench"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train, _ = task_sentences("trec6", "train")
    test, _ = task_sentences("trec6", "test")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        cal = work / "calibration.txt"
        cal.write_text("\n".join(train) + "\n")
        if args.causal:
            src = cache_dir() / "tiny-llama-trec"
            if not (src / "config.json").is_file():
                subprocess.run([sys.executable, "bench/tiny_llama.py", "--out", str(src)], check=True)
            data = work / "trec_test.txt"
            data.write_text("\n".join(test) + "\n")
        else:
            src = minilm_dir()
            data = "embed:trec6"
        models = {
            "magnitude-0.5": ["--alpha", "1", "--budget", "0.5"],
            "calibrated-pruning-0.5": ["--alpha", "1", "--budget", "0.5", "--calibration", str(cal)],
            "fpe-a2-same": ["--alpha", "2"],
            "fpe-a2-0.5": ["--alpha", "2", "--budget", "0.5"],
            "fpe-a2-0.5-calibrated": ["--alpha", "2", "--budget", "0.5", "--calibration", str(cal), "--select", "all"],
        }
        if not args.causal:
            models["fpe-a2-shared-grouped"] = ["--alpha", "2", "--split", "shared", "--outgoing", "grouped"]
            models["fpe-a2-shared-tied"] = ["--alpha", "2", "--split", "shared", "--outgoing", "tied"]
        paths = [src]
        for name, flags in models.items():
            fpewiden("convert", str(src), "--out", str(work / name), *flags)
            paths.append(work / name)
        exports = [("original", src, "dense")]
        if not args.causal:
            exports += [
                ("magnitude-0.5", work / "magnitude-0.5", "sparse"),
                ("fpe-a2-same", work / "fpe-a2-same", "sparse"),
                ("fpe-a2-shared-grouped", work / "fpe-a2-shared-grouped", "fast"),
                ("fpe-a2-shared-tied", work / "fpe-a2-shared-tied", "fast"),
            ]
        for name, model, layout in exports:
            out = work / f"{name}.{layout}.onnx"
            fpewiden("export", str(model), "--out", str(out), "--layout", layout)
            paths.append(out)
        cmd = [
            "bench",
            *map(str, paths),
            "--data",
            str(data),
            "--batch-sizes",
            "1,32",
            "--seq-len",
            "32,128",
            "--engines",
            "ort" if not args.causal else "torch,ort",
            "--threads",
            "2",
            "--repeat",
            str(args.repeat),
            "--warmup",
            "3",
            "--json",
            str(args.out / "bench.json"),
            "--markdown",
            str(args.out / "bench.md"),
            "--plot",
            str(args.out / "bench.png"),
            "--force",
        ]
        fpewiden(*cmd)
    seconds = time.perf_counter() - t0
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    (args.out / "command.txt").write_text(f"{command}\n# runtime {seconds:.0f} s on 2 CPU cores\n")
    print((args.out / "bench.md").read_text())


if __name__ == "__main__":
    main()
