"""`fpewiden bench --sweep`: "should I widen this model, and by how much?", one conversion per α, benchmarked
together.

A recipe or an MLP checkpoint is trained for each α through `fpewiden run` (the paper's protocol: α ∈
SWEEP_ALPHAS, α=1 being magnitude pruning). A pretrained Hugging Face folder is not retrained: it is converted at
one budget for α ∈ HF_SWEEP_ALPHAS, optionally calibrated (`--calibration TEXT`) and distilled from the original
(`--epochs N` on that text), and the original and every conversion go through one `fpewiden bench` run.

This module sits above run.py and benchmark/ in the import order: it calls both, neither calls it.
"""

from __future__ import annotations

import json
from pathlib import Path

from fpewiden.benchmark.command import bench_command
from fpewiden.console import console
from fpewiden.errors import FpewidenError
from fpewiden.recipes import Recipe


def sweep_command(
    models: list[Path],
    data: str | None,
    budget: str,
    out: Path,
    calibration: Path | None,
    epochs: int,
    force: bool,
    bench_options: dict,
    reports: tuple[Path | None, Path | None, Path | None] = (None, None, None),
) -> None:
    """`bench --sweep`: a recipe or checkpoint is trained for each α (sweep_recipe); a Hugging Face folder is
    converted, optionally calibrated and distilled (hf_sweep). `reports`: bench's --json, --markdown and --plot,
    written from the sweep's bench once it is done (checked before any work)."""
    from fpewiden.data.specs import data_file
    from fpewiden.io.outputs import check_outputs
    from fpewiden.recipes import recipe_path
    from fpewiden.run import run_recipe

    if len(models) != 1:
        raise FpewidenError("--sweep takes one recipe, checkpoint or Hugging Face folder")
    asked = [p for p in reports if p is not None]
    if reports[2] is not None:
        from fpewiden.benchmark.plot import check_plot_path

        check_plot_path(reports[2])
        if not _has_matplotlib():
            raise FpewidenError("--plot needs matplotlib: pip install 'fpewiden[plot]'")
    source = models[0] if models[0].exists() or models[0].is_dir() else recipe_path(models[0])
    inputs = [source, *([p] if data and (p := data_file(data)) else []), *([calibration] if calibration else [])]
    if any(p.resolve() == out.resolve() or out.resolve() in p.resolve().parents for p in asked):
        raise FpewidenError(f"{asked[0]}: a report inside --sweep-out ({out}) would be replaced with it; name another")
    check_outputs(asked, inputs, force, what="output path")
    if models[0].is_dir():  # a Hugging Face folder: converted (and distilled), not trained from scratch
        if data is None:
            raise FpewidenError("--sweep of a Hugging Face folder needs --data (text, TSV or embed:...)")
        hf_sweep(models[0], data, budget, out, calibration, epochs, force, bench_options)
    else:
        if calibration is not None or epochs:
            raise FpewidenError("--calibration and --epochs apply to --sweep of a Hugging Face folder")
        run_recipe(sweep_recipe(models[0], data, budget), out, force=force, inputs=inputs)
    if asked:
        _write_reports(out, reports, inputs)


def _write_reports(out: Path, reports: tuple[Path | None, Path | None, Path | None], inputs: list[Path]) -> None:
    """The sweep's bench (out/bench.json) written where --json, --markdown and --plot name, and said where."""
    from fpewiden.benchmark.outputs import write
    from fpewiden.console import console
    from fpewiden.io.provenance import Provenance, digest

    doc = json.loads((out / "bench.json").read_text())
    rows = doc["benchmarks"]
    extra = {k: v for k, v in doc.items() if k not in ("benchmarks", "fpewiden")}
    write(rows, *reports, Provenance("bench-sweep", lambda: digest(inputs)), extra)
    console().print("wrote " + ", ".join(str(p) for p in reports if p is not None))


SWEEP_ALPHAS = (1, 2, 4, 8)


def sweep_recipe(source: Path, data: str | None, budget: str, epochs: int = 10) -> Recipe:
    """ "Should I widen this model, and by how much?": α ∈ {1, 2, 4, 8} at one budget, from a recipe or checkpoint.

    α=1 is magnitude pruning to the budget (with budget `same` it would be the dense baseline, which every run
    has anyway, so it is left out).
    """
    from pydantic import ValidationError

    from fpewiden.recipes import Conversion, ModelSpec, load_recipe, schema_error

    alphas = [a for a in SWEEP_ALPHAS if not (a == 1 and budget == "same")]
    conversions = [Conversion(alpha=a, split="random", budget=budget) for a in alphas]
    if source.suffix in (".yaml", ".yml") or not source.exists():
        recipe = load_recipe(source)
        recipe.conversions = conversions  # first: the recipe's own splits may not fit the new data (clause)
        if data:
            try:
                recipe.data = data
            except ValidationError as e:
                raise FpewidenError(schema_error(e)) from None
        recipe.description = (
            f"α sweep at budget {budget} (α=1: magnitude pruning) on recipe {recipe.name}: {recipe.data}."
        )
        recipe.name = f"sweep-{recipe.name}"
        return recipe
    if not data:
        raise FpewidenError("--sweep from a checkpoint needs --data")
    return Recipe(
        name=f"sweep-{source.stem}",
        data=data,
        model=ModelSpec(checkpoint=str(source)),
        epochs=epochs,
        warmup_epochs=0,
        conversions=conversions,
        seeds=[0],
    )


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
    from fpewiden.benchmark.hf_eval import load_eval
    from fpewiden.convert import Budget, Calibration, ConvertOptions, convert
    from fpewiden.data.specs import data_file
    from fpewiden.io.atomic import atomic_dir
    from fpewiden.io.outputs import check_outputs
    from fpewiden.io.provenance import Provenance, digest, mark_dir

    if epochs and calibration is None:
        raise FpewidenError("--sweep --epochs N distils on the --calibration text: pass --calibration FILE")
    if epochs < 0:
        raise FpewidenError("--epochs must not be negative")
    target = Budget.parse(budget)
    load_eval(data, bench_options.get("seed", 0))  # a bad DATA fails here, before any conversion
    inputs = [source, *([p] if (p := data_file(data)) else []), *([calibration] if calibration else [])]
    provenance = Provenance("bench-sweep", lambda: digest(inputs))
    check_outputs([out], inputs, force, provenance=provenance)
    alphas = [a for a in HF_SWEEP_ALPHAS if not (a == 1 and budget == "same")]
    with atomic_dir(out) as stage:
        mark_dir(stage, provenance)
        models = [source]
        for alpha in alphas:
            opts = ConvertOptions(
                alpha=alpha,
                budget=target,
                calibration=Calibration(data=str(calibration)) if calibration else None,
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
    console().print(f"wrote {out / 'bench.json'}, {out / 'bench.md'} and the models ({out}/alpha*/)")
    return rows


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
