"""`fpewiden inspect`, `pack` and `unpack`: what a checkpoint is, and its packed form and back."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from fpewiden.cli.shell import FORCE, PlainUsage, app, user_errors


@app.command(cls=PlainUsage, short_help="What a checkpoint is, and its layers' non-zeros and interference.")
@user_errors
def inspect(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint file or Hugging Face model directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """What a checkpoint is (pruned or widened, calibrated, fine-tuned) and, per layer, its shape, neurons,
    non-zeros, density, feature capacity and mean |cosine|.

    \b
    Example:
      fpewiden inspect runs/small --json
    """
    from fpewiden.console import console, inspect_table, pack_table
    from fpewiden.inspect import inspect_checkpoint, shares_line

    report = inspect_checkpoint(ckpt)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    elif "matrices" in report:  # a packed checkpoint
        typer.echo(f"{report['path']}: {report['what']}")
        console().print(pack_table(report))
    else:
        console().print(inspect_table(report))
        typer.echo(shares_line(report["byte_shares"]))


@app.command(cls=PlainUsage, short_help="Store a pruned or FPE checkpoint packed, to run at its non-zero bytes.")
@user_errors
def pack(
    src: Annotated[Path, typer.Argument(help="A checkpoint with zeros: MLP .safetensors/.pt or Hugging Face folder.")],
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file (MLP) or folder (Hugging Face).")],
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Values as fp32 | bf16 | fp16 | int8 | int4 (int8, int4: every Linear weight, dense ones too, "
            "quantized to nearest, or to the scales convert --quantize recorded; arithmetic in fp32).",
            show_default="each matrix's own",
        ),
    ] = None,
    group_size: Annotated[
        int | None, typer.Option(help="With --dtype int4: columns per scale (16, 32, 64, ...).", show_default="32")
    ] = None,
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Store every Linear weight that has zeros in its smallest packed format (a bitmask and the non-zeros, or,
    for an FPE-widened incoming matrix, its parent's values and a child id per weight), so it runs at its
    non-zero bytes: fpewiden.packed.load(OUT) returns a torch module on fpewiden's kernels. With --dtype int8
    every Linear weight is stored with int8 values and a scale per row (the mask unchanged); with --dtype int4,
    4-bit values and a scale per row and --group-size columns (embedding tables: int8 rows).

    \b
    Example:
      fpewiden pack runs/small --out runs/small-packed
    """
    from fpewiden.console import console, pack_table, progress_bar
    from fpewiden.packed import kernels
    from fpewiden.packed.pack import pack_checkpoint

    with progress_bar() as bar:
        task = bar.add_task("packing", total=None)

        def step(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"packed {name}")

        report = pack_checkpoint(src, out, dtype, force, on_matrix=step, group_size=group_size)
    console().print(pack_table(report))
    if (slower := kernels.slower_here(report)) is not None:
        typer.echo(f"note: {slower}", err=True)
    reason = kernels.native_reason()
    typer.echo(f"kernels: {kernels.path()}" if reason is None else f"kernels: {reason}; the pure-torch fallback runs")


@app.command(cls=PlainUsage, short_help="Restore the dense checkpoint of a packed one, bit for bit.")
@user_errors
def unpack(
    packed: Annotated[Path, typer.Argument(help="A packed checkpoint (fpewiden pack or convert --packed).")],
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file (MLP) or folder (Hugging Face).")],
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Write the dense checkpoint back (every tensor bit for bit, unless pack cast or quantized its values with
    --dtype: then the weights the kernels multiply by, in the original dtype); a
    Hugging Face folder that transformers' from_pretrained loads.

    \b
    Example:
      fpewiden unpack runs/small-packed --out runs/small-dense
    """
    from fpewiden.packed.pack import unpack_checkpoint

    report = unpack_checkpoint(packed, out, force)
    typer.echo(f"wrote {report['dst']} ({report['matrices']} packed matrices unpacked)")
