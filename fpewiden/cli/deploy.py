"""`fpewiden export` and `bench`: a verified ONNX file, and models measured side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fpewiden.cli.shell import FORCE, PlainUsage, app, user_errors


@app.command(cls=PlainUsage, short_help="Verified ONNX export (dense, sparse, fast or packed layout).")
@user_errors
def export(
    ckpt: Annotated[
        Path, typer.Argument(help="MLP checkpoint or Hugging Face model directory (packed: from fpewiden pack).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output .onnx file.")],
    layout: Annotated[
        str,
        typer.Option(
            help="dense | sparse (sparse initializers) | fast (alias block: dense blocks, see docs/export.md) | packed "
            "(a packed checkpoint's matrices as fpewiden's ONNX Runtime op, run at their non-zero bytes)"
        ),
    ] = "dense",
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 (fp16 storage, fp32 arithmetic)")] = "fp32",
    opset: Annotated[
        int | None,
        typer.Option(help="ONNX opset: 13-21 for MLPs, 18-21 for Hugging Face models.", show_default="17; HF 18"),
    ] = None,
    verify: Annotated[bool, typer.Option(help="onnx.checker, then ONNX Runtime against PyTorch.")] = True,
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Export to ONNX with a dynamic batch axis, verified against PyTorch; report size, bytes, nodes and opset.

    \b
    Examples:
      fpewiden export runs/small --out small.onnx --layout dense
      fpewiden export runs/small-packed --out small-packed.onnx --layout packed
    A packed export runs in ONNX Runtime with fpewiden's op registered:
      opts.register_custom_ops_library(str(fpewiden.packed.ort_library()))
    """
    from fpewiden.console import console, export_table, progress_bar
    from fpewiden.export.export import export as run_export

    with progress_bar() as bar:  # tracing and verifying a transformer takes minutes: a log hears it is at work
        task = bar.add_task(f"exporting {ckpt.name} ({layout})", total=1)
        result = run_export(ckpt, out, layout, dtype, opset, verify, force=force)
        bar.update(task, completed=1, description=f"exported {out.name}")
    if "note" in result:
        typer.echo(f"warning: {result['note']}", err=True)
    console().print(export_table(result))


@app.command(cls=PlainUsage, short_help="Accuracy, bytes and measured latency of several models, side by side.")
@user_errors
def bench(
    models: Annotated[
        list[Path], typer.Argument(help="Checkpoints, HF folders or .onnx files; the first is the reference.")
    ],
    data: Annotated[
        str | None,
        typer.Option(
            help="MLPs: a DATA spec. HF models: a text file, a .tsv (text<TAB>label) or .csv, or "
            "embed:trec6|trec50|sst5."
        ),
    ] = None,
    sweep: Annotated[
        bool,
        typer.Option(
            help="MODEL: a recipe or checkpoint (convert+finetune α ∈ {1,2,4,8}) or a HF folder (convert α ∈ {1,2,4})."
        ),
    ] = False,
    budget: Annotated[str, typer.Option(help="With --sweep: the budget every α is held to.")] = "same",
    sweep_out: Annotated[Path, typer.Option(help="With --sweep: directory for the sweep's run.")] = Path("runs/sweep"),
    calibration: Annotated[
        Path | None, typer.Option(help="With --sweep of a HF folder: calibrate each conversion on this text.")
    ] = None,
    epochs: Annotated[
        int, typer.Option(help="With --sweep of a HF folder: distil each conversion from the original (epochs).")
    ] = 0,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,32",
    seq_len: Annotated[str, typer.Option(help="HF models: comma-separated sequence lengths timed.")] = "32,128",
    reference: Annotated[
        Path | None, typer.Option(help="The model the others are compared with (default: the first).")
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="HF models: tokenizer folder (default: a model's).")] = None,
    engines: Annotated[
        str,
        typer.Option(
            help="Comma-separated, of: torch, ort, packed, ort-packed (fpewiden's packed kernels); ort-int8, "
            "ort-int4, torch-int8 add the reference's quantized competitors as rows of their own."
        ),
    ] = "torch,ort",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda (torch engine)")] = "auto",
    repeat: Annotated[
        int,
        typer.Option(help="Timed runs per model, engine and workload; 0 chooses them for about 1 s of each."),
    ] = 0,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 5,
    threads: Annotated[int, typer.Option(help="Intra-op threads for both engines.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the DATA split.")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write JSON here.")] = None,
    markdown: Annotated[Path | None, typer.Option(help="Write a Markdown table here.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Plot accuracy against bytes, and latency: .png, .svg, .pdf or .jpg.")
    ] = None,
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Accuracy, bytes moved per storage format, and measured latency of several models, in one run; the first
    model is the reference.

    \b
    Examples:
      fpewiden bench model/ runs/small runs/wide --data embed:trec6 --markdown r.md --plot r.png
      fpewiden bench base.safetensors wide-ft.safetensors --data digits --batch-sizes 1,32
    """
    options = dict(
        batch_sizes=batch_sizes,
        engines=engines,
        device=device,
        repeat=repeat,
        warmup=warmup,
        threads=threads,
        seed=seed,
        seq_lens=seq_len,
        tokenizer=tokenizer,
    )
    if sweep:
        from fpewiden.sweep import sweep_command

        sweep_command(models, data, budget, sweep_out, calibration, epochs, force, options, (json_out, markdown, plot))
        return
    from fpewiden.benchmark.command import bench_command

    bench_command(
        models, data, json_out=json_out, markdown=markdown, plot=plot, force=force, reference=reference, **options
    )
