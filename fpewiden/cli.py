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
    split: Annotated[str, typer.Option(help="random | clause | feature")] = "random",
    clauses: Annotated[
        Path | None, typer.Option(help="JSON list of lists of input indices (for --split clause).")
    ] = None,
    budget: Annotated[str, typer.Option(help="'same', a non-zero count, or a fraction of the original.")] = "same",
    seed: Annotated[int, typer.Option(help="Seed of the random partitions.")] = 0,
    targets: Annotated[
        list[str] | None, typer.Option(help="Regex on layer names; repeat to add. Default: every hidden layer.")
    ] = None,
    activation: Annotated[str, typer.Option(help="MLP activation: relu | gelu | silu | tanh.")] = "relu",
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
def demo(
    out: Annotated[Path, typer.Option("--out", help="Directory for the demo's checkpoints.")] = Path("runs/demo"),
    seed: Annotated[int, typer.Option(help="Seed for the task, the training and the split.")] = 0,
) -> None:
    """Train a small dense MLP on a built-in Boolean formula task, convert it at α=2, inspect before and after."""
    from fpewiden.demo import run_demo

    run_demo(out, seed)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
