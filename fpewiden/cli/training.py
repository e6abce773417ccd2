"""`fpewiden finetune` and `run`: training with the zero pattern fixed, and recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fpewiden.cli.shell import FORCE, PlainUsage, app, user_errors
from fpewiden.errors import FpewidenError


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
