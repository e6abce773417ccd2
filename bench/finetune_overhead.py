"""Time per training step with masks against the same widened model without masks, same run, CPU.

The masked step adds two elementwise multiplies per masked matrix (gradient before the step, weights after).
Steps alternate between the two settings in rounds so machine noise hits both alike; the medians are compared.

  python bench/finetune_overhead.py [--widths 784,1024,1024,10 --alpha 4 --batch 256 --steps 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from fpewiden.convert import ConvertOptions, convert
from fpewiden.model.chain_mlp import ChainMLP
from fpewiden.model.loaded import load_model
from fpewiden.train.config import TrainConfig
from fpewiden.train.supervised import SupervisedTask
from fpewiden.train.trainer import apply_masks, make_optimizer, mask_grads


def step_times(model, masks, task, opt, steps, batch, gen, mask_ms: list[float]) -> list[float]:
    """Whole-step times; the time spent in the two mask operations alone is appended to `mask_ms`."""
    out = []
    for _ in range(steps):
        idx = torch.randint(task.n_train, (batch,), generator=gen)
        t = time.perf_counter()
        loss = task.loss(model, idx, torch.device("cpu"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t1 = time.perf_counter()
        mask_grads(masks)
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        apply_masks(masks)
        t4 = time.perf_counter()
        out.append(t4 - t)
        if masks:
            mask_ms.append((t2 - t1 + t4 - t3) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="784,1024,1024,10")
    ap.add_argument("--alpha", type=int, default=4)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/results/finetune_overhead.json"))
    args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "dense.safetensors", Path(d) / "fpe.safetensors"
        save_file(ChainMLP.fresh(widths).tensors(), str(src))
        convert(src, dst, ConvertOptions(alpha=args.alpha))
        masked, plain = load_model(dst), load_model(dst)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, widths[0], generator=g)
    task = SupervisedTask(
        x, torch.randint(widths[-1], (8192,), generator=g), x[:10], torch.zeros(10, dtype=torch.int64), "classes"
    )
    cfg = TrainConfig(lr=1e-3)
    # the same dtype conversion train() does: 0/1 float masks
    float_masks = {p: m.to(p.dtype) for p, m in masked.mask_map().items()}
    runs = {"masked": (masked.model, float_masks), "unmasked": (plain.model, {})}
    opts = {k: make_optimizer(list(m.parameters()), cfg) for k, (m, _) in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    mask_ms: list[float] = []
    for name, (model, masks) in runs.items():  # warm-up
        step_times(model, masks, task, opts[name], 10, args.batch, g, [])
    for r in range(args.rounds):  # alternate which setting goes first, so drift hits both alike
        for name in list(runs)[:: 1 if r % 2 == 0 else -1]:
            model, masks = runs[name]
            times[name] += step_times(model, masks, task, opts[name], args.steps // args.rounds, args.batch, g, mask_ms)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "command": "python " + " ".join(sys.argv),
        "widths_before": widths,
        "alpha": args.alpha,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "masked_matrices": len(runs["masked"][1]),
        "median_step_ms": {k: v * 1e3 for k, v in med.items()},
        "overhead": med["masked"] / med["unmasked"] - 1,
        "median_mask_ops_ms": statistics.median(mask_ms),
        "mask_ops_share_of_masked_step": statistics.median(mask_ms) / (med["masked"] * 1e3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
