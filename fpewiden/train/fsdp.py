"""Fully sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`): each rank holds 1/world of the
parameters, gradients and optimizer state, so a widened model that does not fit one device still trains.

What is sharded: every transformer block of a Hugging Face model (the classes transformers itself never splits
across devices, `_no_split_modules`) is one unit, the rest (embeddings, final norm) the root unit; an MLP chain is
sharded layer by layer (each Linear of model/chain_mlp.py is a module of its own). A unit's parameters are gathered
for its forward and backward and freed after, as in FSDP's paper, so a rank holds its shards and one unit whole.

Masks are sharded like their parameters (a DTensor with the parameter's placement), so the trainer's
`mask_grads`/`apply_masks` run unchanged on each rank's shard and the zero pattern stays bit-identical. The
state for `--resume` is a `torch.distributed.checkpoint` folder (each rank writes its own shards); its metadata
file is a pickle, read here with an unpickler that admits only the checkpoint's own metadata classes. The final
model is gathered one tensor at a time onto rank 0 (its full copy plus its shard: never the model twice).

Loading (`load_shards`): finetune builds the model on the meta device, shards it, and each rank reads only its own
rows of every checkpoint tensor (Checkpoint.rows), so no rank holds the whole model before training either.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
from torch import nn

from fpewiden.errors import FpewidenError

STATE_FILE = "fpewiden-state.json"  # epoch and history beside the checkpoint's shards


def units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded as their own unit, innermost first as fully_shard needs (the root is added by
    `_fully_shard`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if found:
        return found[::-1]  # modules() lists parents before their children
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=lambda m: len(m))) if lists else []


def shard(
    model: nn.Module, masks: dict[nn.Parameter, torch.Tensor], device: torch.device
) -> dict[nn.Parameter, torch.Tensor]:
    """Shard `model` in place; returns the masks keyed by the sharded parameters, sharded like them.

    The unsharded originals are released: FSDP copies each rank's shard out of them and keeps no reference, so
    holding them would keep the whole model on every rank.
    """
    from torch.distributed.tensor import distribute_tensor

    name_of = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    by_name = {name_of[id(p)]: m for p, m in masks.items()}
    old = list(model.parameters())
    _fully_shard(model, device)
    with torch.no_grad():
        for p in old:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    params = dict(model.named_parameters(remove_duplicate=False))
    return {
        params[n]: distribute_tensor(m.to(device), params[n].device_mesh, params[n].placements, src_data_rank=None)
        for n, m in by_name.items()
    }


def _policy(device: torch.device) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return {}
    return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}


def _fully_shard(model: nn.Module, device: torch.device) -> None:
    """Make every unit, then the root, an FSDP2 module (innermost first, as fully_shard needs)."""
    from torch.distributed.fsdp import fully_shard

    for unit in units(model):
        fully_shard(unit, **_policy(device))
    fully_shard(model, **_policy(device))


def is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def load_shards(
    model: nn.Module, param_of: dict[str, nn.Parameter], ck, masked: list[str], device: torch.device
) -> dict[nn.Parameter, torch.Tensor]:
    """Shard a model whose parameters are on the meta device (model/loaded.py `load_skeleton`) and fill each
    rank's shard straight from the checkpoint: a rank reads only its rows of each tensor (FSDP2 shards dim 0 in
    ceil(rows / world) pieces), so no rank ever holds the whole model. Returns the masks of the `masked` matrices
    (stored, or the non-zeros of the shard), sharded like their parameters. The masks of matrices without a
    stored mask and without zeros are all ones (training is the same; the writer drops them)."""
    import math

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    aliases: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    ck_of = {n: ck_name for ck_name, p in param_of.items() for n in aliases.get(id(p), [])}
    buffers = {n: b.clone() for n, b in model.named_buffers()}  # made for real by the skeleton; to_empty drops them
    _fully_shard(model, device)
    model.to_empty(device=device)
    with torch.no_grad():
        for n, b in buffers.items():
            model.get_buffer(n).copy_(b)
    rank, world = dist.get_rank(), dist.get_world_size()
    wanted = set(masked)
    masks = {}
    for n, p in model.named_parameters():
        ck_name = ck_of.get(n)
        if ck_name is None:
            raise FpewidenError(f"{ck.path} has no tensor for the model's parameter {n}")
        local = p.to_local()
        rows = p.shape[0]
        start = min(rows, rank * math.ceil(rows / world))
        stop = start + local.shape[0]
        with torch.no_grad():
            t = ck.rows(ck_name, start, stop)
            local.copy_(t)
        if ck_name not in wanted:
            continue
        stored = ck.mask(ck_name)
        m = stored[start:stop] if stored is not None else t != 0
        del t
        masks[p] = DTensor.from_local(
            m.to(device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
        )
    return masks


def gather(model: nn.Module, main: bool) -> dict[str, torch.Tensor]:
    """The full parameters by module name on rank 0 (empty on the others), gathered one at a time: every rank
    takes part in each gather, only rank 0 keeps a CPU copy."""
    out: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        if main:
            out[n] = full.detach().to("cpu", torch.float32).clone()
        del full
    return out


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint's metadata (dataclasses of shapes, dtypes and offsets), nothing else."""

    def find_class(self, module: str, name: str):
        if module.startswith("torch.distributed.checkpoint."):
            obj = getattr(__import__(module, fromlist=[name]), name)
            if isinstance(obj, type):
                return obj
        if module == "torch" and name == "Size":
            return torch.Size
        if module == "torch.serialization" and name == "_get_layout":  # a layout by its name (torch.strided)
            return torch.serialization._get_layout
        if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath"):  # the writer's path
            import pathlib

            return getattr(pathlib, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)):
            return getattr(torch, name)
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _broadcast_path(path: Path | None, main: bool) -> Path:
    """Rank 0's stage folder, told to every rank (as bytes in a tensor: nothing pickled)."""
    import torch.distributed as dist

    raw = torch.zeros(4096, dtype=torch.uint8)
    if main:
        b = str(path).encode()
        raw[: len(b)] = torch.frombuffer(bytearray(b), dtype=torch.uint8)
    dist.broadcast(raw, 0)
    return Path(bytes(raw[raw != 0].tolist()).decode())


def save_state(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, epoch: int, history: list, record: dict | None
) -> None:
    """Write the resume state to the folder `path`, atomically: every rank writes its shards into rank 0's
    stage folder, which replaces `path` only when all of them are done."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from fpewiden import __version__
    from fpewiden.io.atomic import atomic_dir
    from fpewiden.io.provenance import MARKER

    main = dist.get_rank() == 0
    msd, osd = get_state_dict(model, opt)
    if not main:
        stage = _broadcast_path(None, False)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(stage))
        dist.barrier()
        dist.barrier()
        return
    with atomic_dir(path) as stage:
        _broadcast_path(stage, True)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(stage))
        dist.barrier()
        (stage / STATE_FILE).write_text(json.dumps({"epoch": epoch, "history": history}) + "\n")
        if record:
            rec = {"version": __version__, "command": record["command"], "written_by": record}
            (stage / MARKER).write_text(json.dumps(rec) + "\n")
    dist.barrier()


def load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, list]:
    """Load the state `save_state` wrote into the sharded model and optimizer; returns (epoch, history)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    try:
        info = json.loads((path / STATE_FILE).read_text())
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, storage_reader=_reader(path))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return int(info["epoch"]), list(info["history"])
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError, EOFError, CheckpointException) as e:
        if isinstance(e, CheckpointException) and e.failures:  # one per rank: say the first rank's reason
            first = next(iter(e.failures.values()))
            e = getattr(first, "exc", first)
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FpewidenError(
            f"--resume: {path} does not belong to this model and configuration (or is corrupt): {why}"
        ) from None
