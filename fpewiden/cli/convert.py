"""`fpewiden convert`: the flags of a conversion, the progress bar, the report and its notes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fpewiden.cli.shell import FORCE, PlainUsage, app, user_errors
from fpewiden.errors import FpewidenError


@app.command(cls=PlainUsage, short_help="Prune or widen (FPE) a checkpoint to an exact non-zero budget.")
@user_errors
def convert(
    src: Annotated[Path, typer.Argument(help="MLP state dict (.safetensors/.pt/.bin) or Hugging Face model dir.")],
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file, or directory for HF models.")],
    alpha: Annotated[
        int, typer.Option(help="Children per neuron; 1 widens nothing (magnitude pruning to --budget).")
    ] = 2,
    split: Annotated[
        str,
        typer.Option(
            help="random | clause | feature | shared (one partition per layer) | grouped:G (G partitions, "
            "each for a group of neurons) | activation (calibrated)"
        ),
    ] = "random",
    clauses: Annotated[
        Path | None, typer.Option(help="JSON list of lists of input indices (for --split clause).")
    ] = None,
    budget: Annotated[
        str,
        typer.Option(
            help="same | a fraction of the original non-zeros (0.5 or 50%) | a count (300000) | all (no pruning). "
            "A bare 1 is refused as ambiguous."
        ),
    ] = "same",
    seed: Annotated[int, typer.Option(help="Seed of the random partitions.")] = 0,
    targets: Annotated[
        list[str] | None, typer.Option(help="Regex on layer names; repeat to add. Default: every hidden layer.")
    ] = None,
    activation: Annotated[str, typer.Option(help="MLP activation: relu | gelu | silu | tanh.")] = "relu",
    outgoing: Annotated[
        str,
        typer.Option(
            help="copy (the paper) | tied (children share the parent's column: original bytes) | grouped (output r "
            "keeps child r mod α of each parent)"
        ),
    ] = "copy",
    overlap: Annotated[
        float, typer.Option(help="Control experiment: share of inputs that also reach a second child (0 = FPE).")
    ] = 0.0,
    calibration: Annotated[
        str | None,
        typer.Option(
            help="Calibrate on this data: a text file (HF models, one sample per line) or a DATA spec (MLPs)."
        ),
    ] = None,
    calibration_samples: Annotated[
        int | None, typer.Option(help="Calibration samples.", show_default="up to 16k tokens; MLPs 8192 rows")
    ] = None,
    importance: Annotated[
        str | None, typer.Option(help="magnitude | activation (output-space saliency).", show_default="activation")
    ] = None,
    reconstruct: Annotated[
        bool | None,
        typer.Option(
            "--reconstruct/--no-reconstruct", help="Refit the kept weights to the original output.", show_default="on"
        ),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(help="Neurons to widen: all | wasserstein (see --expand-fraction).", show_default="all"),
    ] = None,
    expand_fraction: Annotated[
        float | None,
        typer.Option(help="With --select wasserstein: share of each layer's neurons widened.", show_default="0.05"),
    ] = None,
    solver: Annotated[
        str | None,
        typer.Option(
            help="The refits: exact (a least-squares solve per row) | cg (conjugate gradients to the same "
            "solution: for LLM widths) | obs (SparseGPT's update) | auto (exact where affordable, else cg).",
            show_default="auto",
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(help="Where the calibrated refits run: auto | cpu | cuda.", show_default="auto"),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8 | int4: put the converted layers' weights on that grid, rounding errors compensated on "
            "the calibration data (GPTQ); needs --calibration. --packed (or pack --dtype) stores exactly these."
        ),
    ] = None,
    group_size: Annotated[
        int | None, typer.Option(help="With --quantize int4: inputs per scale.", show_default="32")
    ] = None,
    packed: Annotated[
        bool, typer.Option("--packed", help="Write the packed checkpoint (see fpewiden pack) instead of the dense one.")
    ] = False,
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Prune (--alpha 1) or widen (FPE, --alpha 2+) a checkpoint to an exact non-zero budget.

    FPE splits each hidden neuron into α children that share its incoming weights disjointly and copy its
    outgoing weights, then prunes the pair back to the budget. --calibration fits what is kept to the model's
    behaviour on sample data (for a pretrained model: use it).

    \b
    Examples:
      fpewiden convert model/ --out small --alpha 1 --budget 0.5 --calibration text.txt
      fpewiden convert mlp.safetensors --out wide.safetensors --alpha 2 --split random
    """
    from fpewiden.console import bytes_bar, console, convert_table, pack_table
    from fpewiden.convert import Budget, Calibration, ConvertOptions, Quantization, load_clauses
    from fpewiden.convert import convert as run_convert

    flags = {
        "--calibration-samples": ("samples", calibration_samples),
        "--importance": ("importance", importance),
        "--reconstruct": ("reconstruct", reconstruct),
        "--select": ("select", select),
        "--expand-fraction": ("fraction", expand_fraction),
        "--solver": ("solver", solver),
        "--device": ("device", device),
    }
    given = {flag: kv for flag, kv in flags.items() if kv[1] is not None}
    if given and calibration is None:
        raise FpewidenError(f"{next(iter(given))} needs --calibration FILE")
    calibrated = dict(given.values())
    if expand_fraction is not None:  # a share of neurons only means something for the Wasserstein selection
        if select == "all":
            raise FpewidenError("--expand-fraction applies to --select wasserstein (--select all widens every neuron)")
        calibrated["select"] = "wasserstein"

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
        calibration=Calibration(data=calibration, **calibrated) if calibration is not None else None,
        quantize=Quantization.of(quantize, group_size),
    )
    from fpewiden.inspect import convert_note

    note = [convert_note]  # said once the work starts (a refused command stays one line), not after it
    if calibration is not None:  # a process-wide setting: the command's to make, never the library's
        from fpewiden.memory import return_freed_memory

        return_freed_memory()  # chunk-sized tensors come and go per pair: give them back when freed
    with bytes_bar() as bar:
        task = bar.add_task("converting", total=None)

        def step(name: str, done: int, total: int) -> None:
            if note and (line := note.pop()(src)) is not None:
                typer.echo(f"note: {line}", err=True)
            bar.update(task, completed=done, total=total, description=f"converted {name}")

        report = run_convert(src, out, opts, on_pair=step, force=force, clauses_path=clauses, packed=packed)
    console().print(convert_table(report))
    if packed:
        console().print(pack_table(report["packed"]))
        from fpewiden.packed.kernels import slower_here

        if (slower := slower_here(report["packed"])) is not None:
            typer.echo(f"note: {slower}", err=True)
    for warning in report["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    short = sum(r["short_neurons"] for r in report["layers"])
    if short:
        typer.echo(
            f"note: {short} neuron(s) have fewer non-zero inputs than α={alpha}; their extra children are empty",
            err=True,
        )
    if calibration is not None and alpha > 1 and src.is_dir():
        typer.echo(
            "note: on a pretrained MiniLM, widening with calibration stayed below calibrated pruning (--alpha 1) "
            "at the same non-zeros (bench/results/calibration); compare both on your model",
            err=True,
        )
