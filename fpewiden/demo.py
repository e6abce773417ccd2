"""The README's main job: a dense MLP on a built-in DNF task, widened by FPE, inspected before and after."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from fpewiden.convert import ConvertOptions, convert
from fpewiden.inspect import inspect_checkpoint
from fpewiden.io.atomic import atomic_file
from fpewiden.report import console, convert_table, inspect_table
from fpewiden.train.loop import FitConfig, fit
from fpewiden.train.mlp import ChainMLP
from fpewiden.train.tasks import DnfSpec, make_dnf

TASK = "dnf:inputs=32,clauses=16,literals=3,outputs=clauses,n=8000"


def run_demo(out: Path, seed: int = 0) -> None:
    out.mkdir(parents=True, exist_ok=True)
    con = console()
    task = make_dnf(DnfSpec.parse(TASK))
    model = ChainMLP.fresh([task.spec.inputs, 8, task.y.shape[1]], "relu", seed)
    con.print(f"[bold]task[/] {TASK}  ({len(task.x)} train / {len(task.x_val)} held-out samples)")
    history = fit(model, (task.x, task.y, task.x_val, task.y_val), FitConfig(epochs=15, lr=1e-2, seed=seed))
    last = history[-1]
    con.print(
        f"dense 32→8→16 MLP after {len(history)} epochs: per-clause accuracy {last['accuracy']:.3f}, "
        f"exact match {last['exact_match']:.3f}"
    )
    dense = out / "dense.safetensors"
    with atomic_file(dense) as tmp:
        save_file(model.tensors(), str(tmp), metadata={"fpewiden.activation": "relu"})
    clauses = out / "clauses.json"
    clauses.write_text(json.dumps(task.clause_groups()))
    wide = out / "fpe_a2_random.safetensors"
    report = convert(dense, wide, ConvertOptions(alpha=2, split="random", seed=seed))
    con.print(convert_table(report))
    con.print(inspect_table(inspect_checkpoint(dense)))
    con.print(inspect_table(inspect_checkpoint(wide)))
    con.print(f"wrote {dense}, {wide} and {clauses} (for --split clause).")
