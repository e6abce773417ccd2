"""The `fpewiden` command line: parse, call, print. Heavy imports happen inside commands so --help is instant."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from fpewiden.errors import FpewidenError

app = typer.Typer(
    name="fpewiden",
    help="Fixed Parameter Expansion: more neurons, the same non-zeros (arXiv 2510.04500).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., object])


def user_errors(fn: F) -> F:
    """Turn FpewidenError into one line on stderr and exit code 2: no traceback, nothing half-written."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except FpewidenError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; nothing was written", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@user_errors
def convert(
    src: Annotated[Path, typer.Argument(help="MLP state dict (.safetensors/.pt/.bin) or Hugging Face model dir.")],
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file, or directory for HF models.")],
    alpha: Annotated[int, typer.Option(help="Children per neuron (α ≥ 2).")] = 2,
    split: Annotated[str, typer.Option(help="random | clause | feature | shared (one partition per layer)")] = "random",
    clauses: Annotated[
        Path | None, typer.Option(help="JSON list of lists of input indices (for --split clause).")
    ] = None,
    budget: Annotated[
        str,
        typer.Option(help="'same', a non-zero count, a fraction of the original, or 'all' (expand, no pruning)."),
    ] = "same",
    seed: Annotated[int, typer.Option(help="Seed of the random partitions.")] = 0,
    targets: Annotated[
        list[str] | None, typer.Option(help="Regex on layer names; repeat to add. Default: every hidden layer.")
    ] = None,
    activation: Annotated[str, typer.Option(help="MLP activation: relu | gelu | silu | tanh.")] = "relu",
    outgoing: Annotated[
        str, typer.Option(help="copy (the paper) | grouped (output r keeps child r mod α of each parent: 1:α)")
    ] = "copy",
    overlap: Annotated[
        float, typer.Option(help="Control experiment: share of inputs that also reach a second child (0 = FPE).")
    ] = 0.0,
) -> None:
    """Widen every hidden neuron into α children at exactly the same (or a given) non-zero count."""
    from fpewiden.convert import Budget, ConvertOptions, load_clauses
    from fpewiden.convert import convert as run_convert
    from fpewiden.report import console, convert_table, progress_bar

    opts = ConvertOptions(
        alpha=alpha,
        split=split,
        clauses=load_clauses(clauses) if clauses is not None else None,
        budget=Budget.parse(budget),
        seed=seed,
        targets=list(targets or []),
        activation=activation,
        outgoing=outgoing,
        overlap=overlap,
    )
    with progress_bar() as bar:
        task = bar.add_task("converting", total=None)

        def step(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"converted {name}")

        report = run_convert(src, out, opts, on_pair=step)
    console().print(convert_table(report))


@app.command()
@user_errors
def inspect(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file or Hugging Face model directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Per layer: shape, neurons, non-zeros, density, feature capacity, mean |cosine|; totals and FPE metadata."""
    from fpewiden.inspect import inspect_checkpoint
    from fpewiden.report import console, inspect_table

    report = inspect_checkpoint(ckpt)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        console().print(inspect_table(report))


@app.command()
@user_errors
def finetune(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint: dense, pruned or converted (MLP file or HF dir).")],
    data: Annotated[
        str, typer.Option(help="dnf:k=v,..., digits, a .safetensors/.npz/.pt file, or text for --teacher.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output checkpoint (same format as the input).")],
    epochs: Annotated[int | None, typer.Option(help="Epochs.  [default: 10]")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.  [default: 1e-3]")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size per process.  [default: 128]")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam | adamw | sgd  [default: adam]")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay.  [default: 0]")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda  [default: auto]")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for data order and splits.  [default: 0]")] = None,
    teacher: Annotated[Path | None, typer.Option(help="Distil from this HF checkpoint on --data text lines.")] = None,
    recipe: Annotated[Path | None, typer.Option(help="Take training settings from a recipe; flags override.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT.state.pt after an interruption.")] = False,
    dropconnect: Annotated[
        float | None,
        typer.Option(help="Drop each weight with this probability at every step (MLPs; a baseline).  [default: 0]"),
    ] = None,
) -> None:
    """Train with the zero pattern fixed: masks re-applied after every step, saved with the output."""
    from fpewiden.recipes import train_config
    from fpewiden.report import console, progress_bar
    from fpewiden.train.finetune import finetune as run_finetune
    from fpewiden.train.trainer import Distributed

    flags = dict(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        optimizer=optimizer,
        weight_decay=weight_decay,
        device=device,
        seed=seed,
        dropconnect=dropconnect,
    )
    cfg = train_config(recipe, {k: v for k, v in flags.items() if v is not None})
    show = Distributed.from_env().main
    with progress_bar(disable=not show) as bar:
        task = bar.add_task("training", total=None)

        def step(epoch: int, s: int, n: int, total: int) -> None:
            bar.update(task, completed=(epoch - 1) * n + s, total=total * n, description=f"epoch {epoch}/{total}")

        def epoch_done(m: dict[str, float]) -> None:
            if show:
                bar.console.print(
                    "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in m.items())
                )

        summary = run_finetune(ckpt, data, out, cfg, teacher, resume, on_step=step, on_epoch=epoch_done)
    if show:
        final = summary["final"]
        console().print(
            f"wrote {out} ({summary['data']}); final: "
            + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
        )


@app.command()
@user_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see recipes/).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for checkpoints, results.json and results.md.")],
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds, overriding the recipe's.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Total epochs, overriding the recipe's.")] = None,
    warmup_epochs: Annotated[int | None, typer.Option(help="Dense warm-up epochs, overriding the recipe's.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
) -> None:
    """Warm up dense, convert each configuration, fine-tune, train the dense baseline as long, compare."""
    from fpewiden.recipes import load_recipe
    from fpewiden.run import run_recipe

    overrides: dict[str, object] = {}
    if seeds is not None:
        try:
            overrides["seeds"] = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise FpewidenError(f"--seeds {seeds!r}: expected comma-separated integers") from None
    for key, val in (("epochs", epochs), ("warmup_epochs", warmup_epochs), ("device", device)):
        if val is not None:
            overrides[key] = val
    run_recipe(load_recipe(recipe, overrides), out)


@app.command()
@user_errors
def export(
    ckpt: Annotated[Path, typer.Argument(help="MLP checkpoint or Hugging Face model directory.")],
    out: Annotated[Path, typer.Option("--out", help="Output .onnx file.")],
    layout: Annotated[
        str, typer.Option(help="dense | sparse (sparse initializers) | fast (alias block: dense blocks, see README)")
    ] = "dense",
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 (fp16 storage, fp32 arithmetic)")] = "fp32",
    opset: Annotated[int, typer.Option(help="ONNX opset (13-21).")] = 17,
    verify: Annotated[bool, typer.Option(help="onnx.checker, then ONNX Runtime against PyTorch.")] = True,
) -> None:
    """Export to ONNX with a dynamic batch axis; verify against PyTorch; report size, bytes, nodes and opset."""
    from fpewiden.export.export import export as run_export
    from fpewiden.report import console, export_table

    result = run_export(ckpt, out, layout, dtype, opset, verify)
    if "note" in result:
        typer.echo(f"warning: {result['note']}", err=True)
    console().print(export_table(result))


@app.command()
@user_errors
def bench(
    models: Annotated[list[Path], typer.Argument(help="Checkpoints or .onnx files; the first is the reference.")],
    data: Annotated[str | None, typer.Option(help="DATA spec whose held-out split gives the task metric.")] = None,
    sweep: Annotated[
        bool, typer.Option(help="MODEL is a recipe or checkpoint: convert+finetune α ∈ {1,2,4,8}.")
    ] = False,
    budget: Annotated[str, typer.Option(help="With --sweep: the budget every α is held to.")] = "same",
    sweep_out: Annotated[Path, typer.Option(help="With --sweep: directory for the sweep's run.")] = Path("runs/sweep"),
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,32",
    engines: Annotated[str, typer.Option(help="torch,ort")] = "torch,ort",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (torch engine)")] = "auto",
    repeat: Annotated[int, typer.Option(help="Timed runs per model, engine and batch size.")] = 100,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 10,
    threads: Annotated[int, typer.Option(help="Intra-op threads for both engines.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the DATA split.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write JSON here.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown table here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write accuracy-against-bytes PNG here.")] = None,
) -> None:
    """Accuracy, bytes moved per storage format, and measured latency of several models, in one run."""
    import torch

    from fpewiden.bench.measure import ENGINES
    from fpewiden.bench.measure import bench as run_bench
    from fpewiden.bench.report import table, write
    from fpewiden.report import console
    from fpewiden.train.data import load_data
    from fpewiden.train.trainer import resolve_device

    if sweep:
        from fpewiden.run import run_recipe, sweep_recipe

        if len(models) != 1:
            raise FpewidenError("--sweep takes one recipe or checkpoint")
        run_recipe(sweep_recipe(models[0], data, budget), sweep_out)
        return
    if data is None:
        raise FpewidenError("--data is required (a DATA spec such as dnf:clauses=16 or digits)")
    engine_list = [e.strip() for e in engines.split(",") if e.strip()]
    bad = [e for e in engine_list if e not in ENGINES]
    if bad or not engine_list:
        raise FpewidenError(f"--engines: unknown engine {bad[0] if bad else ''!r}; choose from torch, ort")
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise FpewidenError(f"--batch-sizes {batch_sizes!r}: expected comma-separated integers") from None
    if not sizes or min(sizes) < 1 or repeat < 1 or warmup < 0:
        raise FpewidenError("--batch-sizes, --repeat must be positive and --warmup not negative")
    torch.set_num_threads(threads)
    dataset = load_data(data, seed)
    rows = run_bench(list(models), dataset, sizes, engine_list, resolve_device(device), repeat, warmup, threads)
    console().print(table(rows))
    write(
        rows,
        json_out,
        markdown,
        plot,
        {
            "data": dataset.describe(),
            "batch_sizes": sizes,
            "engines": engine_list,
            "repeat": repeat,
            "warmup": warmup,
            "threads": threads,
        },
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
