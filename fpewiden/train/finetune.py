"""`fpewiden finetune`: load a checkpoint, train it with its zero pattern fixed, write it back in the same format."""

from __future__ import annotations

import gc
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fpewiden import __version__
from fpewiden.data.specs import Dataset, data_file, load_data
from fpewiden.devices import resolve_device
from fpewiden.errors import FpewidenError
from fpewiden.fpe.expand import count
from fpewiden.io.atomic import atomic_file
from fpewiden.io.checkpoint import open_checkpoint
from fpewiden.io.outputs import check_outputs
from fpewiden.io.provenance import Provenance, json_document
from fpewiden.io.write import write_like
from fpewiden.model.loaded import LoadedModel, load_model
from fpewiden.train.config import TrainConfig
from fpewiden.train.supervised import SupervisedTask
from fpewiden.train.trainer import (
    auto_threads,
    available_cores,
    check_fsdp,
    setup_distributed,
    teardown_distributed,
    train,
)


def sidecar(dst: Path, suffix: str) -> Path:
    """Files that belong to an output sit beside it: `model.safetensors.log.json`, `out_dir.state.pt`."""
    return dst.parent / f"{dst.name}{suffix}"


def local_numel(p: torch.Tensor) -> int:
    """Elements this process holds: a sharded (DTensor) parameter's local shard, else the whole tensor."""
    return (p.to_local() if hasattr(p, "to_local") else p).numel()


def check_fit(tr: LoadedModel, data: Dataset) -> None:
    """The data's widths must match the model's first and last layers."""
    if tr.n_inputs is not None and tr.n_inputs != data.n_inputs:
        raise FpewidenError(
            f"{data.spec} has {data.n_inputs} input features but the model's first layer reads {tr.n_inputs}"
        )
    if tr.n_outputs is None:
        return
    if data.kind == "classes" and data.n_outputs > tr.n_outputs:
        raise FpewidenError(
            f"{data.spec} has class labels up to {data.n_outputs - 1} but the model has {tr.n_outputs} outputs"
        )
    if data.kind != "classes" and data.n_outputs != tr.n_outputs:
        raise FpewidenError(
            f"{data.spec} has {data.n_outputs} {data.kind} targets per sample but the model has {tr.n_outputs} outputs"
        )


def finetune(
    ckpt: Path,
    data_spec: str,
    dst: Path,
    cfg: TrainConfig,
    teacher: Path | None = None,
    resume: bool = False,
    recipe: dict | None = None,
    on_step: Callable[[int, int, int, int], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    force: bool = False,
    inputs: list[Path] | None = None,
    tokenizer: Path | None = None,
) -> dict:
    """Train `ckpt` on `data_spec` (or distil from `teacher` on a text file) and write `dst`; returns a summary.

    `inputs`: further files the caller read (a recipe), which no output may touch. `recipe`: the resolved recipe
    this run belongs to, recorded in the output's metadata.
    """
    state = sidecar(dst, ".state" if cfg.fsdp else ".state.pt")  # FSDP: a torch.distributed.checkpoint folder
    log_path, clauses_path = sidecar(dst, ".log.json"), sidecar(dst, ".clauses.json")
    read = [ckpt, *(p for p in (teacher, data_file(data_spec), tokenizer) if p is not None), *(inputs or [])]
    provenance = Provenance(
        "finetune",
        lambda: open_checkpoint(ckpt).sha256(),
        "a distilled checkpoint" if teacher is not None else "a fine-tuned checkpoint",
    )
    check_outputs([dst, log_path, clauses_path, state], read, force, provenance=provenance)
    if resume and not (state.is_dir() if cfg.fsdp else state.is_file()):
        raise FpewidenError(f"--resume: no state file {state} to resume from")
    torch.manual_seed(cfg.seed)
    # under FSDP every rank reads only its shards (train/fsdp.py load_shards): nothing is loaded whole here,
    # unless the checkpoint lacks a parameter transformers must initialise (then it is sharded after a whole load)
    skeleton = None
    if cfg.fsdp:
        from fpewiden.model.loaded import load_skeleton

        skeleton = load_skeleton(ckpt)
    tr, masked = skeleton if skeleton is not None else (load_model(ckpt), None)
    if cfg.dropconnect and tr.ck.kind == "hf":
        raise FpewidenError("--dropconnect is for MLP checkpoints (it drops every weight matrix of the chain)")
    if tr.ck.kind == "mlp" and dst.suffix not in (".safetensors", ".pt", ".pth", ".bin"):
        raise FpewidenError(f"--out {dst}: name the output *.safetensors or *.pt")
    before = {n: m.clone() for n, m in tr.masks.items()}
    clauses = None
    params = sum(p.numel() for p in tr.model.parameters())
    if teacher is not None:
        torch.set_num_threads(cfg.threads or available_cores())
        task, spec = _distill_task(tr, teacher, Path(data_spec), cfg.seed, tokenizer)
    else:
        if tr.ck.kind == "hf":
            raise FpewidenError("Hugging Face models are fine-tuned by distillation: pass --teacher and a text file")
        data = load_data(data_spec, cfg.seed)
        check_fit(tr, data)
        torch.set_num_threads(cfg.threads or auto_threads(params * cfg.batch_size))
        task, spec, clauses = (
            SupervisedTask(data.x, data.y, data.x_val, data.y_val, data.kind),
            data.describe(),
            data.clauses,
        )
    dc_params = list(tr.model.weights) if cfg.dropconnect else []
    module_of = {}  # checkpoint name -> module parameter name: how FSDP's gathered tensors map back
    if cfg.fsdp:
        module_name = {id(p): n for n, p in tr.model.named_parameters(remove_duplicate=False)}
        module_of = {ck: module_name[id(p)] for ck, p in tr.param_of.items()}
    device = resolve_device(cfg.device)
    dist, owns_group = setup_distributed(device)
    try:
        masks = tr.mask_map()
        if masked is not None:
            from fpewiden.train.fsdp import load_shards

            check_fsdp(cfg, dist, bool(tr.ties()))
            masks = load_shards(tr.model, tr.param_of, tr.ck, masked, device)
        history = train(
            tr.model, task, cfg, masks, state, resume, on_step, on_epoch, dc_params, tr.ties(), provenance.record()
        )  # fmt: skip
        held = sum(local_numel(p) for p in tr.model.parameters())  # this rank's share
        if cfg.fsdp:  # the trained parameters live in the shards: gather them onto rank 0, one at a time
            from fpewiden.train.fsdp import gather

            full = gather(tr.model, dist.main)
            tr.param_of = {ck: nn.Parameter(full[m], requires_grad=False) for ck, m in module_of.items() if full}
            # the shards hold the device mesh and through it the process group: free them while every rank is
            # still in the group, not at interpreter exit (where a gloo group's teardown aborted a rank in CI)
            tr.model = nn.Module()
            gc.collect()
    finally:
        if owns_group:
            teardown_distributed()
    if not dist.main:
        return {"history": history, "final": history[-1] if history else {}}
    if masked is not None:  # the masks the shards were loaded with, now whole on rank 0 to check and write them
        from fpewiden.model.loaded import masks_of

        tr.masks = masks_of(tr.ck, masked)
        before = tr.masks
    for n, m in before.items():  # the zero pattern must be exactly what it was
        assert torch.equal(tr.masks[n], m) and not bool(tr.tensors()[n][~m].any()), n
    summary = {
        "checkpoint": str(ckpt),
        "out": str(dst),
        "data": spec,
        "teacher": str(teacher) if teacher else None,
        "config": cfg.model_dump(),
        "threads": torch.get_num_threads(),
        "parameters_per_rank": held,  # what rank 0 held while training (under FSDP its shard)
        "nnz": sum(count(tr.tensors()[n] != 0) for n in tr.masks) if tr.masks else None,
        "history": history,
        "before": history[0] if history and history[0]["epoch"] == 0 else {},
        "final": history[-1] if history else {},
    }
    meta = tr.ck.meta
    meta.version, meta.kind = __version__, tr.ck.kind
    if tr.ck.kind == "mlp":
        meta.activation = tr.activation
    meta.train_data, meta.train_epochs, meta.train_config = spec, cfg.epochs, cfg.model_dump()
    meta.train_final = summary["final"]
    if recipe is not None:
        meta.recipe = recipe
    meta.written_by = provenance.record()
    write_like(tr.ck, dst, tr.tensors(), tr.packed_masks(), meta.strings(), provenance)
    with atomic_file(log_path) as tmp:
        tmp.write_text(json.dumps(json_document(summary, provenance), indent=2) + "\n")
    if clauses:
        with atomic_file(clauses_path) as tmp:
            tmp.write_text(json.dumps(json_document({"clauses": clauses}, provenance)) + "\n")
    if state.is_dir():
        shutil.rmtree(state)
    state.unlink(missing_ok=True)
    return summary


def _distill_task(tr: LoadedModel, teacher: Path, text: Path, seed: int, tokenizer: Path | None):
    from fpewiden.data.text import load_tokenizer, read_sentences
    from fpewiden.train.distill import DistillTask, check_compatible

    if tr.ck.kind != "hf":
        raise FpewidenError("--teacher distillation is for Hugging Face model directories")
    sentences = read_sentences(text)
    t = load_model(teacher)
    if t.ck.kind != "hf":
        raise FpewidenError(f"--teacher {teacher} is not a Hugging Face model directory")
    check_compatible(tr.ck.config or {}, t.ck.config or {})
    tok = load_tokenizer([teacher, tr.ck.path], tokenizer)
    task = DistillTask(tok, t.model, sentences, seed=seed)
    return task, f"distill {text} ({task.n_train} train / {len(task.val)} held-out sentences) from {teacher}"
