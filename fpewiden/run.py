"""`fpewiden run`: the paper's protocol end to end, for every seed of a recipe.

Per seed: a fresh dense MLP (or the recipe's checkpoint) is trained for the warm-up epochs; the dense baseline
continues from there for the remaining epochs; every conversion starts from the same warm model, is converted
and fine-tuned for the same remaining epochs with its zero pattern fixed. So every model sees the same data for
the same total number of epochs, and FPE is compared with dense at equal non-zeros. Baselines that train with
more non-zeros (budget `all`, e.g. a wider dense net under DropConnect) set `prune_epochs`: their last epochs
run after magnitude pruning back to the warm model's count, so they too are deployed at equal non-zeros.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import yaml
from safetensors.torch import save_file

from fpewiden import __version__
from fpewiden.benchmark.outputs import write as write_bench
from fpewiden.benchmark.report import CONSOLE_WIDTH
from fpewiden.benchmark.report import console_table as bench_table
from fpewiden.benchmark.report import markdown as bench_markdown
from fpewiden.console import console, progress_bar, results_table
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.data.specs import data_file, load_data
from fpewiden.errors import EmptyLayerError
from fpewiden.io.atomic import atomic_dir, atomic_file
from fpewiden.io.metadata import FpeMetadata
from fpewiden.io.outputs import check_outputs
from fpewiden.io.provenance import Provenance, digest, json_document, mark_dir, markdown_marker
from fpewiden.model.chain_mlp import ChainMLP
from fpewiden.recipes import Conversion, Recipe
from fpewiden.significance import difference_text, mean_interval, paired
from fpewiden.train.finetune import finetune

METRICS = ("exact_match", "accuracy", "mse", "cosine", "loss")


def _fresh_model(recipe: Recipe, seed: int, path: Path) -> Path:
    data = load_data(recipe.data, seed)
    widths = [data.n_inputs, *recipe.model.hidden, data.n_outputs]
    model = ChainMLP.fresh(widths, recipe.model.activation, seed)
    with atomic_file(path) as tmp:
        meta = FpeMetadata(version=__version__, kind="mlp", activation=recipe.model.activation)
        save_file(model.tensors(), str(tmp), metadata=meta.strings())
    if data.clauses:
        (path.parent / "clauses.json").write_text(json.dumps(data.clauses) + "\n")
    return path


def _summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds for each model label (first appearance order), each metric's 95% interval of the mean,
    and for every model but dense its paired difference to dense by seed (fpewiden/significance.py)."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        by_label.setdefault(r["model"], []).append(r)
    out = []
    for label, rs in by_label.items():
        entry = {"model": label, "seeds": len(rs), "neurons": rs[0]["neurons"], "nnz": rs[0]["nnz"]}
        for m in METRICS:
            for key, stage in ((m, "final"), (f"{m}_at_conversion", "initial")):
                vals = [r[stage][m] for r in rs if m in r.get(stage, {})]
                if vals:
                    iv = mean_interval(vals)
                    entry[key] = {
                        "mean": statistics.fmean(vals),
                        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                        "ci95": [iv[1], iv[2]] if iv else None,
                        "values": vals,
                    }
        out.append(entry)
    dense = by_label.get("dense", [])
    for entry in out:
        metric = next((m for m in METRICS if m in entry), None)
        if entry["model"] != "dense" and dense and metric is not None:
            own = {r["seed"]: r["final"][metric] for r in by_label[entry["model"]] if metric in r["final"]}
            base = {r["seed"]: r["final"][metric] for r in dense if metric in r["final"]}
            entry["vs_dense"] = {"metric": metric, **(paired(own, base) or {"mean": None})}
    return out


def difference_column(summary: list[dict]) -> str | None:
    metric = next((s["vs_dense"]["metric"] for s in summary if "vs_dense" in s), None)
    return f"Δ {metric} vs dense (95% CI)" if metric else None


def difference_cell(s: dict, digits: int = 4, short: bool = False) -> str:
    d = s.get("vs_dense")
    if d is None:
        return "-"
    return "one seed: no interval" if d["mean"] is None else difference_text(d, digits, short)


def table_columns(summary: list[dict]) -> list[str]:
    """The metrics after fine-tuning, then the first of them as it was right after conversion."""
    metrics = [m for m in METRICS if any(m in s for s in summary)]
    return [*metrics, f"{metrics[0]}_at_conversion"] if metrics else metrics


QUANTIZED_NOTE = (
    "Rows naming int8 or int4: the fine-tuned model above them with its weights on that grid (its mask unchanged), "
    "scored as its values dequantize; the closing bench leaves them out (its engines run fp32 weights): "
    "`fpewiden pack --dtype` and `fpewiden bench` give their bytes and speed."
)


def markdown(recipe: Recipe, summary: list[dict], left_out: list[dict] | None = None) -> str:
    metrics = table_columns(summary)
    diff = difference_column(summary)
    lines = [
        f"# {recipe.name}",
        "",
        recipe.description.strip(),
        "",
        f"data `{recipe.data}`, {recipe.epochs} epochs ({recipe.warmup_epochs} dense warm-up), "
        f"seeds {recipe.seeds}; mean ± std over seeds. Δ: the paired difference to dense, seed by seed, with its "
        "95% t interval; 'not distinguishable' where that interval holds 0.",
        "",
        "| model | neurons | non-zeros | " + " | ".join([*metrics, *filter(None, [diff])]) + " |",
        "|---|---|---|" + "---|" * (len(metrics) + bool(diff)),
    ]
    for s in summary:
        cells = [f"{s[m]['mean']:.4f} ± {s[m]['std']:.4f}" if m in s else "" for m in metrics]
        cells += [difference_cell(s)] if diff else []
        lines.append(f"| {s['model']} | {s['neurons']} | {s['nnz']} | " + " | ".join(cells) + " |")
    if any(c.quantize for c in recipe.conversions):
        lines += ["", QUANTIZED_NOTE]
    for x in left_out or []:
        lines.append(f"\nLeft out: {x['model']} (seed {x['seed']}): {x['reason']}.")
    return "\n".join(lines) + "\n"


def run_recipe(recipe: Recipe, out: Path, force: bool = False, inputs: list[Path] | None = None) -> dict:
    """Run every seed and conversion of `recipe` into the folder `out` (built in a stage, swapped in at the end).

    `inputs`: files the caller read (the recipe), which `out` must not touch.
    """
    read = [Path(p) for p in (data_file(recipe.data), recipe.model.checkpoint) if p is not None]
    resolved = json.dumps(recipe.to_dict(), sort_keys=True)
    provenance = Provenance("run", lambda: digest([resolved, *read]))
    check_outputs([out], [*read, *(inputs or [])], force, provenance=provenance)
    with atomic_dir(out) as stage:
        mark_dir(stage, provenance)
        result = _run(recipe, stage, out, provenance)
    console().print(
        f"wrote {out / 'results.json'}, {out / 'results.md'}"
        + (f", {out / 'bench.json'}, {out / 'bench.png'}" if result["bench"] else "")
    )
    return result


def _run(recipe: Recipe, stage: Path, out: Path, provenance: Provenance) -> dict:
    """The protocol, writing into `stage`; results name paths as they will be once `stage` is `out`."""
    (stage / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    recipe_meta = recipe.to_dict()
    rest = recipe.epochs - recipe.warmup_epochs
    rows: list[dict] = []
    left_out: list[dict] = []
    jobs = len(recipe.seeds) * (2 + sum(2 + len(c.quantize) for c in recipe.conversions))
    with progress_bar() as bar:
        task = bar.add_task("run", total=jobs)

        def tick(what: str) -> None:
            bar.update(task, advance=1, description=what)

        for seed in recipe.seeds:
            d = stage / f"seed{seed}"
            d.mkdir(exist_ok=True)
            init = (
                Path(recipe.model.checkpoint)
                if recipe.model.checkpoint
                else _fresh_model(recipe, seed, d / "init.safetensors")
            )
            warm = d / "warm.safetensors"
            if recipe.warmup_epochs:
                finetune(init, recipe.data, warm, recipe.train_config(recipe.warmup_epochs, seed), recipe=recipe_meta)
            else:
                warm = init
            tick(f"seed {seed}: dense warm-up")
            dense = finetune(
                warm, recipe.data, d / "dense.safetensors", recipe.train_config(rest, seed), recipe=recipe_meta
            )
            tick(f"seed {seed}: dense baseline")
            rows.append(_row("dense", d / "dense.safetensors", dense, seed, dense["before"]))
            for c in recipe.conversions:
                split = c.split.replace(":", "")
                name = f"a{c.alpha}_{split}_{c.outgoing}_{c.budget}_o{c.overlap}_dc{c.dropconnect}".replace(".", "p")
                if c.calibrate:
                    name += f"_cal_{c.importance[0]}{int(c.reconstruct)}_{c.select[0]}{c.expand_fraction:g}".replace(
                        ".", "p"
                    )
                conv = d / f"{name}.safetensors"
                clauses = json.loads((d / "clauses.json").read_text()) if c.split == "clause" else None
                opts = c.options(seed=seed, activation=recipe.model.activation, data=recipe.data, clauses=clauses)
                try:
                    report = convert(warm, conv, opts)
                except EmptyLayerError as e:  # this conversion cannot exist; the others' work still counts
                    left_out.append({"model": c.label, "seed": seed, "reason": str(e)})
                    console().print(f"note: seed {seed}, {c.label}: left out: {e}")
                    for _ in range(2 + len(c.quantize)):
                        tick(f"seed {seed}: {c.label} left out")
                    continue
                tick(f"seed {seed}: convert {c.label}")
                final = d / f"{name}_ft.safetensors"
                trained = d / f"{name}_pre.safetensors" if c.prune_epochs else final
                res = finetune(
                    conv,
                    recipe.data,
                    trained,
                    recipe.train_config(rest - c.prune_epochs, seed, c.dropconnect),
                    recipe=recipe_meta,
                )
                initial = res["before"]
                if c.prune_epochs:  # back to the dense count, then fine-tune the rest with that mask fixed
                    pruned = d / f"{name}_pruned.safetensors"
                    budget = Budget("count", report["nnz_before"])
                    opts = ConvertOptions(alpha=1, budget=budget, seed=seed, activation=recipe.model.activation)
                    convert(trained, pruned, opts)
                    res = finetune(
                        pruned,
                        recipe.data,
                        final,
                        recipe.train_config(c.prune_epochs, seed),
                        recipe=recipe_meta,
                    )
                tick(f"seed {seed}: fine-tune {c.label}")
                rows.append(_row(c.label, final, res, seed, initial))
                for bits in c.quantize:
                    quantized = d / f"{name}_{bits}.safetensors"
                    _quantize(final, quantized, c, bits, recipe, seed)
                    metrics = evaluate_checkpoint(quantized, recipe.data, seed)
                    rows.append(_row(c.quantized_label(bits), quantized, {"final": metrics}, seed, {}) | {"grid": bits})
                    tick(f"seed {seed}: {c.label}, {bits}")
    summary = _summarise(rows)
    bench_rows = _bench_first_seed(recipe, rows) if recipe.bench_repeat > 0 else []
    for r in rows:
        r["path"] = str(out / Path(r["path"]).relative_to(stage))
    for b in bench_rows:
        b["path"] = str(out / Path(b["path"]).relative_to(stage))
    result = {"recipe": recipe.to_dict(), "runs": rows, "summary": summary, "bench": bench_rows, "left_out": left_out}
    (stage / "results.json").write_text(json.dumps(json_document(result, provenance), indent=2) + "\n")
    md = markdown(recipe, summary, left_out)
    if bench_rows:
        write_bench(bench_rows, stage / "bench.json", None, stage / "bench.png", provenance, {"data": recipe.data})
        md += (
            f"\n## Bench (seed {recipe.seeds[0]})\n\n"
            + bench_markdown(bench_rows)
            + "\n![accuracy against bytes](bench.png)\n"
        )
    (stage / "results.md").write_text(md + f"\n{markdown_marker(provenance)}\n")
    diff = difference_column(summary)
    main = table_columns(summary)[:1] + table_columns(summary)[-1:]  # the rest is in results.md
    cell = lambda s: difference_cell(s, 3, short=True)  # noqa: E731
    console(CONSOLE_WIDTH).print(results_table(recipe.name, summary, main, diff, cell))
    if bench_rows:
        console(CONSOLE_WIDTH).print(bench_table(bench_rows))
    return result


def _quantize(src: Path, dst: Path, c: Conversion, bits: str, recipe: Recipe, seed: int) -> None:
    """The fine-tuned model's weights on `bits`'s grid, its mask unchanged: convert at α=1 and the same non-zeros,
    selecting by magnitude without a refit (so the kept weights are the model's own), quantizing each matrix with
    GPTQ on the recipe's training inputs (or rounding to nearest)."""
    from fpewiden.convert import Calibration

    calibration = Calibration(data=recipe.data, importance="magnitude", reconstruct=False)
    opts = ConvertOptions(
        alpha=1,
        budget=Budget.parse("same"),
        seed=seed,
        activation=recipe.model.activation,
        calibration=calibration,
        quantize=c.quantization(bits),
    )
    convert(src, dst, opts)


def evaluate_checkpoint(path: Path, data_spec: str, seed: int) -> dict[str, float]:
    """Held-out metrics of a checkpoint as it is (no training): the split fine-tuning scores on."""
    from fpewiden.data.labels import evaluate
    from fpewiden.model.loaded import load_model

    data = load_data(data_spec, seed)
    return evaluate(load_model(path).model, data.x_val, data.y_val, data.kind)


def _bench_first_seed(recipe: Recipe, rows: list[dict]) -> list[dict]:
    """Every model the first seed produced, benchmarked together (dense first: the reference), but the quantized
    ones: the engines here run fp32 weights, so they would be timed and counted as fp32 (`fpewiden pack --dtype`
    and `fpewiden bench` measure them)."""
    import torch

    from fpewiden.benchmark.mlp import bench

    seed = recipe.seeds[0]
    rows = [r for r in rows if r["seed"] == seed and "grid" not in r]
    paths = [Path(r["path"]) for r in rows]
    data = load_data(recipe.data, seed)
    device = torch.device("cpu") if recipe.device == "auto" else torch.device(recipe.device)
    out = bench(paths, data, [1, 32], ["torch", "ort"], device, repeat=recipe.bench_repeat, warmup=5, threads=2)
    for r, label in zip(out, [r["model"] for r in rows], strict=True):
        r["model"] = label
    return out


def _row(label: str, path: Path, res: dict, seed: int, initial: dict) -> dict:
    """One model of one seed: its size, its held-out metrics right after conversion (`initial`; for the dense
    baseline, the warm model's) and after fine-tuning (`final`)."""
    from fpewiden.inspect import inspect_checkpoint

    info = inspect_checkpoint(path)
    return {
        "model": label,
        "seed": seed,
        "path": str(path),
        "neurons": info["totals"]["neurons"],
        "nnz": info["totals"]["nnz"],
        "initial": {k: v for k, v in initial.items() if k != "epoch"},
        "final": res["final"],
    }
