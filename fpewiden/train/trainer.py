"""The mask-preserving training loop, on CPU or GPU, one process or many (torchrun).

A masked weight's gradient is zeroed before the optimizer step (so Adam's moments never accumulate there) and
the mask is re-applied after it (so weight decay or momentum cannot revive a pruned position): the zero pattern
is identical, bit for bit, before and after training. Distributed: DistributedDataParallel (NCCL on GPU, gloo on
CPU), or with `fsdp` fully sharded (train/fsdp.py); every rank takes a disjoint shard of each epoch's shuffled
order, masks are identical on every rank because they come from the same checkpoint, and only rank 0 writes
(under FSDP every rank writes its shards of the resume state). Each epoch's order depends only on
(seed, epoch), so a run resumed from its per-epoch state file ends with the same weights as one never stopped.
"""

from __future__ import annotations

import gc
import math
import os
import pickle
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from fpewiden.devices import resolve_device
from fpewiden.errors import FpewidenError
from fpewiden.io.atomic import atomic_file
from fpewiden.io.checkpoint import save_pt
from fpewiden.train.config import TrainConfig
from fpewiden.train.dropconnect import DropConnect


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Below this many multiply-adds per training step, one thread is faster: on 2 shared cores torch's default
# threads made the README's main job (a 32-8-16 MLP) 15x slower (bench/results/threads).
SINGLE_THREAD_WORK = 20_000_000


def auto_threads(macs_per_step: int) -> int:
    """Intra-op threads for a step of this many multiply-adds: 1 for tiny models, every core for large ones."""
    return 1 if macs_per_step < SINGLE_THREAD_WORK else available_cores()


def epoch_seed(seed: int, epoch: int) -> int:
    """The one seed of an epoch: its data order, its DropConnect masks and its dropout draws all derive from it,
    so a run resumed at an epoch boundary draws exactly what an uninterrupted run draws."""
    return seed * 1_000_003 + epoch


class Task(Protocol):
    """What the loop needs from a task: its size, a loss on a batch of indices, and held-out metrics."""

    n_train: int

    def loss(self, model: nn.Module, idx: torch.Tensor, device: torch.device) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Fused kernels where this torch has them: on CPU fused Adam was several times faster than the foreach one, and
    it does not slow down on masked (zero) entries the way the foreach path did (bench/results/README.md)."""
    if cfg.optimizer == "adam":
        cls, kw = torch.optim.Adam, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    elif cfg.optimizer == "adamw":
        cls, kw = torch.optim.AdamW, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    else:
        cls, kw = torch.optim.SGD, {"lr": cfg.lr, "momentum": 0.9, "weight_decay": cfg.weight_decay}
    try:
        return cls(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kw)


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @staticmethod
    def from_env() -> Distributed:
        return Distributed(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> tuple[Distributed, bool]:
    """Join the process group torchrun describes; a plain run is a world of one.

    Returns whether this call created the group, so the caller also tears it down.
    """
    dist = Distributed.from_env()
    if dist.world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(dist.local_rank)
        torch.distributed.init_process_group(backend=backend)
        return dist, True
    return dist, False


def teardown_distributed() -> None:
    """Wait for every rank, then leave the group: a rank that exits while a peer still holds the gloo group can
    abort (SIGABRT) at interpreter exit."""
    try:
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def apply_masks(masks: dict[nn.Parameter, torch.Tensor]) -> None:
    if masks:
        with torch.no_grad():
            torch._foreach_mul_(list(masks), [m.to(p.dtype) for p, m in masks.items()])


def mask_grads(masks: dict[nn.Parameter, torch.Tensor]) -> None:
    """Zero the gradient at pruned positions, so no optimizer state ever builds up there."""
    live = [(p.grad, m) for p, m in masks.items() if p.grad is not None]
    if live:
        torch._foreach_mul_([g for g, _ in live], [m for _, m in live])


def tie_grads(ties: list[tuple[nn.Parameter, int, int]]) -> None:
    """A tied outgoing column is one weight stored as α equal copies: its gradient is the sum of the copies'
    gradients, given to every copy, so the optimizer moves them alike and they stay equal."""
    for p, alpha, dim in ties:
        if p.grad is None:
            continue
        g = p.grad
        if dim == 1:
            s = g.view(g.shape[0], -1, alpha).sum(-1, keepdim=True).expand(-1, -1, alpha)
        else:
            s = g.view(-1, alpha, g.shape[1]).sum(1, keepdim=True).expand(-1, alpha, -1)
        g.copy_(s.reshape(g.shape))


def epoch_order(n: int, seed: int, epoch: int, dist: Distributed) -> torch.Tensor:
    """This rank's shard of the epoch's shuffled order; every rank gets the same number of samples."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))
    per_rank = n // dist.world
    return order[: per_rank * dist.world][dist.rank :: dist.world]


def check_fsdp(cfg: TrainConfig, dist: Distributed, tied: bool) -> None:
    if cfg.fsdp and dist.world == 1:
        raise FpewidenError("--fsdp shards the model across processes: launch with torchrun --nproc-per-node N")
    if cfg.fsdp and tied:
        raise FpewidenError("--fsdp: tied outgoing weights (--outgoing tied) train with DDP; drop --fsdp")
    if cfg.fsdp and cfg.dropconnect:
        raise FpewidenError("--fsdp: --dropconnect (an MLP baseline) trains with DDP; drop --fsdp")


def train(
    model: nn.Module,
    task: Task,
    cfg: TrainConfig,
    masks: dict[nn.Parameter, torch.Tensor] | None = None,
    state_path: Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, int, int, int], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    dropconnect_params: list[nn.Parameter] | None = None,
    ties: list[tuple[nn.Parameter, int, int]] | None = None,
    state_provenance: dict | None = None,
) -> list[dict[str, float]]:
    """Train in place; returns the history: held-out metrics before training (epoch 0), then per epoch the train
    loss and held-out loss and metrics. `ties`: tied outgoing matrices (see `tie_grads`), kept tied.
    `state_provenance`: recorded in the state file (io/provenance.py), so only the same run replaces it.

    `state_path` receives the model, optimizer state and history after every epoch (atomically); with `resume`
    an existing state file is continued from. With `cfg.dropconnect` > 0 the weights in `dropconnect_params` are
    randomly dropped at every step (train/dropconnect.py). A non-finite loss stops training with a one-line error
    that names the epoch and step; the state file then still holds the last good epoch.
    """
    device = resolve_device(cfg.device)
    dist, owns_group = setup_distributed(device)
    try:
        check_fsdp(cfg, dist, bool(ties))
        return _train(
            model,
            task,
            cfg,
            masks,
            state_path,
            resume,
            on_step,
            on_epoch,
            dropconnect_params,
            device,
            dist,
            ties or [],
            state_provenance,
        )
    finally:
        if not cfg.fsdp:
            model.to("cpu")
        if owns_group:
            teardown_distributed()


def _train(
    model, task, cfg, masks, state_path, resume, on_step, on_epoch, dropconnect_params, device, dist, ties, provenance
):
    model.to(device)
    # masks as 0/1 in the parameter's dtype: multiplying by a float mask is >10x faster than by a bool one on CPU
    masks = {p: m.to(device=device, dtype=p.dtype) for p, m in (masks or {}).items()}
    apply_masks(masks)
    wrapped: nn.Module = model
    if cfg.fsdp:
        from fpewiden.train import fsdp

        if not fsdp.is_sharded(model):  # finetune loads its shards straight from the checkpoint (load_shards)
            masks = fsdp.shard(model, masks, device)
    elif dist.world > 1:
        _freeze_unused(model, task, device)
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if device.type == "cuda" else None
        )
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
    dc = DropConnect(list(dropconnect_params or []), cfg.dropconnect)
    history: list[dict[str, float]] = []
    start = 0
    if cfg.fsdp and resume and state_path is not None and state_path.is_dir():
        start, history = fsdp.load_state(state_path, model, opt)
    elif resume and state_path is not None and state_path.is_file():
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError):
            raise FpewidenError(
                f"--resume: {state_path} does not belong to this model and configuration (or is corrupt)"
            ) from None
        start, history = int(state["epoch"]), list(state["history"])
    else:
        before = {"epoch": 0, **task.evaluate(model, device)}
        history.append(before)
        if on_epoch:
            on_epoch(before)
    # bf16 on GPU; under FSDP its mixed-precision policy casts the gathered parameters instead
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and not cfg.fsdp)
    n_steps = math.ceil((task.n_train // dist.world) / cfg.batch_size)
    for epoch in range(start, cfg.epochs):
        torch.manual_seed(epoch_seed(cfg.seed, epoch))  # dropout and other global-RNG draws of this epoch
        wrapped.train()
        order = epoch_order(task.n_train, cfg.seed, epoch, dist)
        dc.start_epoch(epoch_seed(cfg.seed, epoch))
        total, count = 0.0, 0
        for step, i in enumerate(range(0, len(order), cfg.batch_size)):
            idx = order[i : i + cfg.batch_size]
            dc.drop()
            with autocast:
                loss = task.loss(wrapped, idx, device)
            if not bool(torch.isfinite(loss.detach())):
                dc.restore()
                where = f" ({state_path} holds epoch {epoch})" if state_path is not None and epoch else ""
                raise FpewidenError(
                    f"loss became {float(loss.detach())} at epoch {epoch + 1}, step {step + 1}; stopped{where}"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dc.restore()
            mask_grads(masks)
            tie_grads(ties)
            opt.step()
            apply_masks(masks)
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            if on_step:
                on_step(epoch + 1, step + 1, n_steps, cfg.epochs)
        metrics = {"epoch": epoch + 1, "train_loss": total / max(count, 1), **task.evaluate(model, device)}
        history.append(metrics)
        if on_epoch:
            on_epoch(metrics)
        if state_path is not None and cfg.fsdp:
            fsdp.save_state(state_path, model, opt, epoch + 1, history, provenance)
        elif state_path is not None and dist.main:
            with atomic_file(state_path) as tmp:
                save_pt(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch + 1,
                        "history": history,
                        "fpewiden_metadata": {"kind": "training state"},
                        **({"fpewiden_provenance": provenance} if provenance else {}),
                    },
                    tmp,
                )
        if state_path is not None:
            _crash_if_asked(epoch + 1, dist)
    if wrapped is not model:  # DDP's reducer holds the process group: freed now, while every rank is still in it,
        del wrapped, opt  # not at interpreter exit after teardown (a rank aborted there in the suite, under load)
        gc.collect()
    return history


def _freeze_unused(model: nn.Module, task: Task, device: torch.device) -> list[str]:
    """Freeze the parameters the task's loss never reaches (a BERT pooler under distillation, which pools the
    hidden states): DDP waits for a gradient of every trainable parameter and fails without one. One backward pass
    on two samples finds them, the same on every rank; they would not have changed anyway (no gradient), and
    DDP's find_unused_parameters would search the graph at every step instead."""
    model.zero_grad(set_to_none=True)
    # the probe's dropout draws leave the run's own untouched
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        task.loss(model, torch.arange(min(2, task.n_train)), device).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        if n in unused:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    return unused


CRASH_ENV = "FPEWIDEN_CRASH_AFTER_EPOCH"


def _crash_if_asked(epoch: int, dist: Distributed) -> None:
    """The kill-and-resume tests' hook: with FPEWIDEN_CRASH_AFTER_EPOCH=N the run dies by SIGKILL right after
    epoch N's resume state is written (every rank, once all have written), as a crash would: no cleanup runs. A
    stop at a known point, where a test that polled for the state file and killed raced the next epoch."""
    if os.environ.get(CRASH_ENV) != str(epoch):
        return
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()
    os.kill(os.getpid(), signal.SIGKILL)
