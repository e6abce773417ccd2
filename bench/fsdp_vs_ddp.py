"""FSDP against DDP fine-tuning on 2 CPU processes (gloo): the same final weights, and what each rank holds.

A Llama-shaped model (random weights, llama_shaped.py) is widened with FPE (`convert --alpha 2`, uncalibrated)
and distilled from the original for one epoch on TREC questions by `torchrun --nproc-per-node 2 fpewiden
finetune --teacher`, once with DDP and once with `--fsdp`, the same global batch. Reported: wall time, the peak
RSS of the largest process (getrusage of the launcher's children), net of a torchrun whose workers only import
the libraries; the parameters rank 0 held while training (finetune's log, `parameters_per_rank`) with their
Adam state (two moments shaped like each parameter, so sharded alike); and the largest relative difference of
the final weights. The teacher sits on every rank in inference mode (it has no gradients or optimizer state).

  python bench/fsdp_vs_ddp.py [--hidden 768 --ffn 2048 --layers 8 --sentences 96 --out bench/results/fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def run_children(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and the peak RSS (bytes) of the largest process `cmd` started (ru_maxrss of the children is
    a maximum over them); each call runs in a fresh helper process so earlier runs don't count."""
    helper = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter()\n"
        "r = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True)\n"
        "if r.returncode: sys.stderr.write(r.stdout[-2000:] + r.stderr[-4000:]); sys.exit(1)\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", helper, json.dumps(cmd)], capture_output=True, text=True, env=ENV)
    if res.returncode:
        raise SystemExit(res.stderr)
    seconds, peak = res.stdout.split()
    return float(seconds), int(peak)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--sentences", type=int, default=96)
    ap.add_argument("--out", type=Path, default=Path("bench/results/fsdp"))
    args = ap.parse_args()
    import torch
    from llama_shaped import build

    from fpewiden.convert import ConvertOptions, convert
    from fpewiden.data.embeddings import task_sentences
    from fpewiden.io.checkpoint import open_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = build(tmp / "llama", args.hidden, args.ffn, args.layers, args.heads, 4, "float32")
        wide = tmp / "fpe"
        convert(src, wide, ConvertOptions(alpha=2))
        text = tmp / "text.txt"
        text.write_text("\n".join(task_sentences("trec6", "train")[0][: args.sentences]) + "\n")
        probe = tmp / "imports.py"
        probe.write_text("import torch, transformers, fpewiden.train.finetune\n")
        base_cmd = [*TORCHRUN, str(probe)]
        rows["baseline"] = dict(zip(("seconds", "peak_bytes"), run_children(base_cmd), strict=True))
        ft = [*TORCHRUN, "-m", "fpewiden", "finetune", str(wide), "--teacher", str(src), "--data", str(text),
              "--epochs", "1", "--batch-size", "4", "--device", "cpu"]  # fmt: skip
        for mode in ("ddp", "fsdp"):
            t = time.perf_counter()
            seconds, peak = run_children([*ft, "--out", str(tmp / mode), *(["--fsdp"] if mode == "fsdp" else [])])
            log = json.loads((tmp / f"{mode}.log.json").read_text())
            rows[mode] = {"seconds": seconds, "peak_bytes": peak, "held": log["parameters_per_rank"]}
            print(mode, rows[mode], f"{time.perf_counter() - t:.0f} s", flush=True)
        a, b, orig = open_checkpoint(tmp / "ddp"), open_checkpoint(tmp / "fsdp"), open_checkpoint(wide)
        worst, masks_equal, trained = 0.0, True, 0
        for k in a.shapes:
            x, y = a.get(k).float(), b.get(k).float()
            worst = max(worst, float((x - y).norm() / x.norm().clamp_min(1e-30)))
            trained += int(not torch.equal(orig.get(k).float(), x))
            if a.mask(k) is not None:
                masks_equal &= torch.equal(a.mask(k), b.mask(k)) and torch.equal(a.mask(k), orig.mask(k))
        params = sum(int(torch.Size(s).numel()) for s in orig.shapes.values())
    mb = 1 / 2**20
    base = rows["baseline"]["peak_bytes"]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        "# FSDP against DDP: distilling an FPE-widened Llama-shaped model on 2 CPU processes",
        "",
        f"`{command}`",
        "",
        f"Llama-shaped, {args.layers} layers, hidden {args.hidden}, FFN {args.ffn} widened to {2 * args.ffn} "
        f"(`convert --alpha 2`), {params / 1e6:.1f} M parameters stored densely; distilled from the original "
        f"for one epoch on {args.sentences} TREC questions, batch 4 per process, Adam, gloo, 1 thread per "
        f"process. Peak RSS: the largest process, net of workers that only import the libraries "
        f"({base * mb:.0f} MB). Held: the parameters rank 0 held (finetune's log) plus Adam's two moments, fp32.",
        "",
        "| mode | seconds | peak RSS net MB | parameters + Adam held per rank, MB |",
        "|---|---|---|---|",
    ]
    for mode in ("ddp", "fsdp"):
        r = rows[mode]
        lines.append(
            f"| {mode} | {r['seconds']:.0f} | {(r['peak_bytes'] - base) * mb:.0f} | {3 * 4 * r['held'] * mb:.0f} |"
        )
    lines += [
        "",
        f"Final weights, FSDP against DDP: largest relative difference {worst:.1e} over {len(a.shapes)} tensors "
        f"({trained} changed by training); masks bit-identical to each other and to the converted model: "
        f"{'yes' if masks_equal else 'NO'}.",
    ]
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    payload = {"command": command, "rows": rows, "params": params, "max_rel_diff": worst, "masks_equal": masks_equal}
    (args.out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
