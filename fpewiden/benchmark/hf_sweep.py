"""`fpewiden bench --sweep HF_DIR`: should I widen this pretrained model, and by how much?

The recipe sweep (run.sweep_recipe) trains MLPs from scratch; a pretrained transformer is not retrained, so its
sweep converts the folder at one budget for α ∈ HF_SWEEP_ALPHAS (α=1: pruning through the same path), optionally
calibrated (`--calibration TEXT`) and distilled from the original (`--epochs N` on the calibration text), and
benchmarks the original and every conversion together in one `fpewiden bench` run.
"""

from __future__ import annotations

import json
from pathlib import Path

from fpewiden.console import console
from fpewiden.errors import FpewidenError

# α=8 on a pretrained FFN is left out: calibrated, its outgoing refit solves an (8·d_ff)² system per layer
HF_SWEEP_ALPHAS = (1, 2, 4)


def hf_sweep(
    source: Path,
    data: str,
    budget: str,
    out: Path,
    calibration: Path | None,
    epochs: int,
    force: bool,
    bench_options: dict,
) -> list[dict]:
    """Convert (and distil) `source` for every α into the folder `out`, then bench them all; returns bench rows."""
    from fpewiden.benchmark.command import bench_command
    from fpewiden.benchmark.hf import load_eval
    from fpewiden.convert import Budget, Calibration, ConvertOptions, convert
    from fpewiden.data.specs import data_file
    from fpewiden.io.atomic import atomic_dir
    from fpewiden.io.outputs import check_outputs, mark_dir

    if epochs and calibration is None:
        raise FpewidenError("--sweep --epochs N distils on the --calibration text: pass --calibration FILE")
    if epochs < 0:
        raise FpewidenError("--epochs must not be negative")
    target = Budget.parse(budget)
    load_eval(data, bench_options.get("seed", 0))  # a bad DATA fails here, before any conversion
    inputs = [source, *([p] if (p := data_file(data)) else []), *([calibration] if calibration else [])]
    check_outputs([out], inputs, force)
    alphas = [a for a in HF_SWEEP_ALPHAS if not (a == 1 and budget == "same")]
    with atomic_dir(out) as stage:
        mark_dir(stage, "bench-sweep")
        models = [source]
        for alpha in alphas:
            opts = ConvertOptions(
                alpha=alpha,
                budget=target,
                calibration=Calibration(str(calibration)) if calibration else None,
            )
            conv = stage / f"alpha{alpha}"
            console().print(f"α={alpha}: convert" + (" (calibrated)" if calibration else ""))
            convert(source, conv, opts)
            if epochs:
                from fpewiden.train.config import TrainConfig
                from fpewiden.train.finetune import finetune

                console().print(f"α={alpha}: distil {epochs} epochs from {source}")
                tuned = stage / f"alpha{alpha}-distilled"
                finetune(conv, str(calibration), tuned, TrainConfig(epochs=epochs, lr=1e-4, batch_size=32), source)
                conv = tuned
            models.append(conv)
        rows = bench_command(
            models,
            data,
            json_out=stage / "bench.json",
            markdown=stage / "bench.md",
            plot=stage / "bench.png" if _has_matplotlib() else None,
            force=False,
            **bench_options,
        )
        for name in ("bench.json", "bench.md"):  # models named by where they will be, not by the stage
            p = stage / name
            p.write_text(p.read_text().replace(str(stage), str(out)))
        sweep = {"source": str(source), "budget": budget, "alphas": alphas, "calibration": str(calibration or "")}
        (stage / "sweep.json").write_text(json.dumps({"fpewiden": "bench-sweep", **sweep, "epochs": epochs}) + "\n")
    console().print(f"wrote {out}/bench.json, bench.md and the models (alpha*/)")
    return rows


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
