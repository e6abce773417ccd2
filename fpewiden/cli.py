"""The `fpewiden` command line: parse, call, print. Heavy imports happen inside commands so --help is instant."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from fpewiden.errors import FpewidenError


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, missing value, bad type) as one `error:` line and exit code 2, like every
    other user error, instead of click's usage block or rich's framed box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(130)
        except typer.TyperException as e:  # typer's (vendored) click usage errors all derive from it
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()  # type: ignore[attr-defined]
                sys.exit(2)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            typer.echo(f"error: {message}{hint}", err=True)
            sys.exit(2)
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return rv


class PlainUsage(TyperCommand):
    """Usage lines as users write them (`fpewiden convert [OPTIONS] SRC`), not typer's `{src}`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = (p.metavar or p.name or "").upper()
                name += "..." if p.nargs != 1 else ""
                pieces.append(name if p.required else f"[{name}]")
        return pieces


TOP_HELP = """Make a trained model smaller at a measured accuracy cost, run it at its non-zero bytes,
or widen it at the same non-zeros (Fixed Parameter Expansion, FPE: arXiv 2510.04500).
What each command gained and cost, measured: README.md's goal table and bench/results/.

\b
Smaller, for a pretrained model: calibrated pruning
  fpewiden convert MODEL --out small --alpha 1 --budget 0.5 --calibration text.txt
\b
Faster: store it packed and run it on fpewiden's kernels (one input at a time; token
batches are not faster)
  fpewiden pack small --out small-packed     (Python: fpewiden.packed.load("small-packed"))
  In ONNX Runtime: fpewiden export small-packed --out small.onnx --layout packed, then
  register fpewiden.packed.ort_library() in the session.
\b
Wider at the same non-zeros (FPE), then train: pays on models trained after the
conversion; on a pretrained MiniLM it stays below calibrated pruning
  fpewiden convert MODEL --out wide --alpha 2 && fpewiden finetune wide --data DATA --out wide-ft
\b
Measure accuracy, bytes and latency side by side:
  fpewiden bench MODEL small wide --data embed:trec6 --engines torch,ort,packed --plot r.png
"""

app = typer.Typer(
    name="fpewiden",
    cls=OneLineErrors,
    rich_markup_mode=None,  # plain help: `--verify / --no-verify` and real defaults, no boxes
    help=TOP_HELP,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., object])
FORCE = typer.Option(
    "--force",
    help="Replace an existing output even when it is not what this command would write again from the same "
    "input (a fine-tuned model, another command's output, a file fpewiden did not write).",
)


def _quiet_libraries() -> None:
    """No library chatter before our one line, and never the network: models and tokenizers come from disk."""
    warnings.simplefilter("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)  # torch.onnx logs optional-package notes as warnings
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)


def user_errors(fn: F) -> F:
    """Turn FpewidenError and OS errors (disk full, read-only, no permission) into one line on stderr and exit
    code 2: no traceback. Outputs are staged, so nothing half-written remains."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except FpewidenError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            typer.echo(f"error: {e.strerror or e}{where}; nothing was written", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; nothing was written", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


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
        calibration=Calibration(calibration, **calibrated) if calibration is not None else None,
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


@app.command(cls=PlainUsage, short_help="Train with the zero pattern fixed (or distil from a teacher).")
@user_errors
def finetune(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint: dense, pruned or converted (MLP file or HF dir).")],
    data: Annotated[
        str,
        typer.Option(
            help="dnf:k=v,..., digits, embed:trec6|trec50|sst5, a .safetensors/.npz/.pt file, or text for --teacher."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output checkpoint (same format as the input).")],
    epochs: Annotated[int | None, typer.Option(help="Epochs.", show_default="10")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate.", show_default="1e-3; 1e-4 with --teacher")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Batch size per process.", show_default="128; 32 with --teacher")
    ] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam | adamw | sgd", show_default="adam")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay.", show_default="0")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda", show_default="auto")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for data order and splits.", show_default="0")] = None,
    threads: Annotated[
        int | None, typer.Option(help="Intra-op threads; 0 picks from the model's size.", show_default="0")
    ] = None,
    teacher: Annotated[Path | None, typer.Option(help="Distil from this HF checkpoint on --data text lines.")] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer folder, when neither the teacher nor the student has one.")
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="Take training settings from a recipe; flags override.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT.state.pt after an interruption.")] = False,
    dropconnect: Annotated[
        float | None,
        typer.Option(help="Drop each weight with this probability at every step (MLPs; a baseline).", show_default="0"),
    ] = None,
    fsdp: Annotated[
        bool,
        typer.Option(
            "--fsdp/--no-fsdp",
            help="Shard parameters, gradients and optimizer state across torchrun's processes (FSDP2), not DDP.",
        ),
    ] = False,
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Train with the zero pattern fixed (masks re-applied after every step); MLPs on DATA, Hugging Face models
    by distillation from --teacher on a text file.

    \b
    Examples:
      fpewiden finetune wide.safetensors --data digits --out wide-ft.safetensors --epochs 10
      fpewiden finetune runs/small --teacher model/ --data text.txt --out runs/small-distilled
      torchrun --nproc-per-node 8 -m fpewiden finetune runs/big --teacher model/ --data t.txt --out o --fsdp
    """
    from fpewiden.console import console, progress_bar
    from fpewiden.recipes import recipe_path, train_config
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
        threads=threads,
        fsdp=fsdp or None,
    )
    cfg = train_config(recipe, {k: v for k, v in flags.items() if v is not None}, distill=teacher is not None)
    show = Distributed.from_env().main
    with progress_bar(disable=not show) as bar:
        task = bar.add_task("training", total=None)

        def step(epoch: int, s: int, n: int, total: int) -> None:
            bar.update(task, completed=(epoch - 1) * n + s, total=total * n, description=f"epoch {epoch}/{total}")

        def epoch_done(m: dict[str, float]) -> None:
            if show:
                label = "before training" if m.get("epoch") == 0 else f"epoch {m['epoch']}"
                bar.console.print(
                    label + "  " + "  ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))
                )

        summary = run_finetune(
            ckpt,
            data,
            out,
            cfg,
            teacher,
            resume,
            on_step=step,
            on_epoch=epoch_done,
            force=force,
            inputs=[recipe_path(recipe)] if recipe is not None else None,
            tokenizer=tokenizer,
        )
    if show:
        final = summary["final"]
        console().print(
            f"wrote {out} ({summary['data']}; {summary['threads']} thread(s)); final: "
            + ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
        )


@app.command(cls=PlainUsage, short_help="Run a recipe: dense baseline against each conversion, over seeds.")
@user_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see recipes/).")],
    out: Annotated[Path, typer.Option("--out", help="Directory for checkpoints, results.json and results.md.")],
    seeds: Annotated[str | None, typer.Option(help="Comma-separated seeds, overriding the recipe's.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Total epochs, overriding the recipe's.")] = None,
    warmup_epochs: Annotated[int | None, typer.Option(help="Dense warm-up epochs, overriding the recipe's.")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    threads: Annotated[
        int | None, typer.Option(help="Intra-op threads; 0 picks from the model's size.", show_default="recipe's")
    ] = None,
    force: Annotated[bool, FORCE] = False,
) -> None:
    """Run a recipe: warm up dense, convert each configuration, fine-tune, train the dense baseline as long,
    compare over seeds.

    \b
    Example:
      fpewiden run polysemantic --out runs/polysemantic
    """
    from fpewiden.recipes import load_recipe, recipe_path
    from fpewiden.run import run_recipe

    overrides: dict[str, object] = {}
    if seeds is not None:
        try:
            overrides["seeds"] = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise FpewidenError(f"--seeds {seeds!r}: expected comma-separated integers") from None
    for key, val in (("epochs", epochs), ("warmup_epochs", warmup_epochs), ("device", device), ("threads", threads)):
        if val is not None:
            overrides[key] = val
    run_recipe(load_recipe(recipe, overrides), out, force=force, inputs=[recipe_path(recipe)])


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
            help="dense | sparse (sparse initializers) | fast (alias block: dense blocks, see README) | packed "
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
    from fpewiden.console import console, export_table
    from fpewiden.export.export import export as run_export

    result = run_export(ckpt, out, layout, dtype, opset, verify, force=force)
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
            help="MLPs: a DATA spec. HF models: a text file, a TSV (label<TAB>text) or embed:trec6|trec50|sst5."
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
