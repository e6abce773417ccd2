"""Write a checkpoint with the same layout as one that was read: same file names, tensor names and dtypes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fpewiden.errors import FpewidenError
from fpewiden.io.atomic import atomic_dir, atomic_file
from fpewiden.io.checkpoint import MASK_PREFIX, MASKS_FILE, SCALE_PREFIX, Checkpoint, save_pt
from fpewiden.io.provenance import MARKER, Provenance, mark_dir
from fpewiden.io.safetensors_stream import DTYPES


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A whole dict of tensors: the safetensors library's own writer, then fsync before the stage is renamed."""
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_masks(
    path: Path, masks: dict[str, torch.Tensor], metadata: dict[str, str], scales: dict[str, torch.Tensor] | None = None
) -> None:
    """A Hugging Face folder's fpewiden_masks.safetensors: bit-packed masks by tensor name, with fpewiden's
    metadata (pack keeps only the masks its layouts do not encode; unpack writes them all back), and the
    quantization scales convert --quantize recorded."""
    tensors = {f"{MASK_PREFIX}{n}": m for n, m in masks.items()}
    tensors.update({f"{SCALE_PREFIX}{n}": s for n, s in (scales or {}).items()})
    _write(path, tensors, metadata)


def write_like(
    ck: Checkpoint,
    dst: Path,
    tensors: dict[str, torch.Tensor],
    packed_masks: dict[str, torch.Tensor],
    metadata: dict[str, str],
    provenance: Provenance,
    config: dict | None = None,
) -> None:
    """`tensors` replace the checkpoint's tensors of the same name (cast to the stored dtype); the rest are copied.

    MLP outputs are one file: `.safetensors` with masks inside, or `.pt` (a weights-only state dict whose masks
    and metadata ride along as tensors and a string dict). Hugging Face outputs are a directory laid out like the
    input, with masks in fpewiden_masks.safetensors.
    """
    full = {
        n: tensors[n].detach().to(torch.device("cpu"), DTYPES[ck.dtypes[n]]).contiguous() if n in tensors else ck.get(n)
        for n in ck.shapes
    }
    masks = {f"{MASK_PREFIX}{n}": m for n, m in packed_masks.items()}
    if ck.kind == "mlp":
        if dst.suffix == ".safetensors":
            with atomic_file(dst) as tmp:
                _write(tmp, {**full, **masks}, metadata)
        elif dst.suffix in (".pt", ".pth", ".bin"):
            with atomic_file(dst) as tmp:
                save_pt({**full, **masks, "fpewiden_metadata": dict(metadata)}, tmp)
        else:
            raise FpewidenError(f"--out {dst}: name the output *.safetensors or *.pt")
        return
    with atomic_dir(dst) as tmp:
        by_file: dict[str, dict[str, torch.Tensor]] = {}
        for n, t in full.items():
            by_file.setdefault(ck.file_of[n], {})[n] = t
        for f, ts in by_file.items():
            _write(tmp / f, ts, metadata)
        write_masks(tmp / MASKS_FILE, packed_masks, metadata)
        write_hf_extras(ck, tmp, config or ck.config or {})
        mark_dir(tmp, provenance)


def write_hf_extras(ck: Checkpoint, out: Path, config: dict, index: bool = True) -> None:
    """Everything of a model directory besides the weights: config (given), shard index (unless `index` is False:
    a writer that renames the weight files writes its own), tokenizer and the rest."""
    files = set(ck.file_of.values())
    copy_extras(ck.path, out, {"config.json", INDEX, MASKS_FILE, MARKER, *files})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if index:
        write_index(ck.path / INDEX, out / INDEX)


INDEX = "model.safetensors.index.json"


def copy_extras(src: Path, out: Path, skip: set[str], skip_suffix: str | None = None) -> None:
    """Every file and folder of model directory `src` except the named ones (and those ending in `skip_suffix`):
    the tokenizer, the generation config and whatever else a user keeps beside the weights."""
    for item in src.iterdir():
        if item.name not in skip and not (skip_suffix and item.name.endswith(skip_suffix)):
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)


def write_index(source: Path, dest: Path, weight_map: dict[str, str] | None = None) -> None:
    """A sharded model's index at `dest`: `source`'s (nothing where it has none), with `weight_map` where the
    tensors now live (None: as they were) and the total size of the files it names beside `dest`."""
    if not source.is_file():
        return
    data = json.loads(source.read_text())
    if weight_map is not None:
        data["weight_map"] = weight_map
    files = set(data.get("weight_map", {}).values())
    data.setdefault("metadata", {})["total_size"] = sum((dest.parent / f).stat().st_size for f in files)
    dest.write_text(json.dumps(data, indent=2) + "\n")
