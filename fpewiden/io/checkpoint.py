"""Open a checkpoint (MLP state dict file or Hugging Face directory) as named tensors plus fpewiden's metadata.

Nothing here unpickles arbitrary objects: `.pt`/`.bin` go through `torch.load(weights_only=True)` and must hold
only tensors. Safetensors are read one tensor at a time so large sharded models never sit in memory whole.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fpewiden.errors import FpewidenError
from fpewiden.io.metadata import FpeMetadata
from fpewiden.io.provenance import hash_file
from fpewiden.io.safetensors_stream import DTYPE_NAMES, Header, read_header, read_rows, read_tensor

MASK_PREFIX = "fpewiden_mask."
SCALE_PREFIX = "fpewiden_scale."  # a quantized matrix's scales (convert --quantize), beside its mask
MASKS_FILE = "fpewiden_masks.safetensors"
PICKLE_SUFFIXES = {".pt", ".pth", ".bin"}


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a boolean mask (1 bit per weight, row-major) into a uint8 vector."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape)) if shape else 1
    bits = np.unpackbits(packed.numpy(), count=n).astype(bool)
    return torch.from_numpy(bits).reshape(shape)


def packed_size(shape: tuple[int, ...]) -> int:
    return (int(np.prod(shape)) + 7) // 8


@dataclass
class Checkpoint:
    """Named tensors, where each lives, fpewiden metadata and masks. Tensors are read on demand."""

    path: Path
    kind: Literal["mlp", "hf"]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    file_of: dict[str, str]  # tensor name -> output file name it belongs in
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None
    headers: dict[str, Header] = field(default_factory=dict)  # tensor name -> safetensors header, when on disk
    memory: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors loaded from a pickle
    packed_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # quantized matrices: (output rows, groups)
    files: list[Path] = field(default_factory=list)  # weight files, for hashing

    def get(self, name: str) -> torch.Tensor:
        if name in self.memory:
            return self.memory[name]
        return read_tensor(self.headers[name], name)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor; from disk only their bytes are read."""
        if name in self.memory:
            return self.memory[name][start:stop]
        return read_rows(self.headers[name], name, start, stop)

    def mask(self, name: str) -> torch.Tensor | None:
        packed = self.packed_masks.get(name)
        return None if packed is None else unpack_mask(packed, self.shapes[name])

    def support(self, name: str, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The stored mask where there is one; otherwise the tensor's non-zeros."""
        m = self.mask(name)
        if m is not None:
            return m
        return (self.get(name) if tensor is None else tensor) != 0

    @property
    def meta(self) -> FpeMetadata:
        """fpewiden's metadata, typed (empty for checkpoints fpewiden did not write)."""
        return FpeMetadata.read(self.metadata)

    def sha256(self, stop: threading.Event | None = None) -> str:
        """Over the weight files' content, sorted by name; `stop` ends the reading early (the result is then
        unused). A safetensors header counts by its parsed content (keys sorted): the safetensors library writes
        metadata in hash-map order, so two identical saves differ in their header bytes."""
        h = hashlib.sha256()
        for p in sorted(self.files):
            if not hash_file(h, p, stop):
                return ""
        return h.hexdigest()


def open_checkpoint(path: Path) -> Checkpoint:
    if not path.exists():
        raise FpewidenError(f"no such file or directory: {path}")
    if path.is_dir():
        return _open_hf_dir(path)
    if path.stat().st_size == 0:
        raise FpewidenError(f"{path} is empty")
    if path.suffix == ".safetensors":
        return _open_safetensors_file(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _open_pickle(path)
    raise FpewidenError(
        f"unsupported checkpoint {path}: expected .safetensors, .pt, .pth, .bin or a Hugging Face model directory"
    )


def _split_masks(ck: Checkpoint, tensors: dict[str, torch.Tensor] | None) -> None:
    for name in [n for n in ck.shapes if n.startswith((MASK_PREFIX, SCALE_PREFIX))]:
        t = tensors[name] if tensors is not None else ck.get(name)
        if name.startswith(MASK_PREFIX):
            ck.packed_masks[name[len(MASK_PREFIX) :]] = t
        else:
            ck.scales[name[len(SCALE_PREFIX) :]] = t
        for d in (ck.shapes, ck.dtypes, ck.file_of, ck.headers, ck.memory):
            d.pop(name, None)


def _packed_error(path: Path) -> FpewidenError:
    """A packed checkpoint (fpewiden/packed/schema.py) where a dense one is read."""
    return FpewidenError(
        f"{path} is a packed checkpoint: run it with fpewiden.packed.load, or get the dense one back with "
        f"fpewiden unpack {path} --out DENSE"
    )


def _open_safetensors_file(path: Path) -> Checkpoint:
    header = read_header(path)
    if "fpewiden.packed" in header.metadata:
        raise _packed_error(path)
    ck = Checkpoint(
        path=path,
        kind="mlp",
        shapes={n: e.shape for n, e in header.entries.items()},
        dtypes={n: e.dtype for n, e in header.entries.items()},
        file_of=dict.fromkeys(header.entries, path.name),
        metadata=header.metadata,
        headers=dict.fromkeys(header.entries, header),
        files=[path],
    )
    _split_masks(ck, None)
    return ck


def load_pt(path: Path) -> object:
    """`torch.load(weights_only=True)` with every failure as one line. Its restricted unpickler accepts tensors
    and plain containers only; on arbitrary bytes it raises almost any exception type (UnpicklingError, EOFError,
    IndexError, KeyError, struct.error, UnicodeDecodeError were all seen), so all of them mean "not readable"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "allowed global" in str(e) or "Unsupported global" in str(e):
            raise FpewidenError(
                f"{path} holds objects other than tensors; refusing to unpickle it (only weights-only state dicts load)"
            ) from None
        raise FpewidenError(f"{path} is not a readable PyTorch file (truncated or corrupt)") from None
    except OSError as e:
        raise FpewidenError(f"cannot read {path}: {e.strerror or e}") from None
    except Exception:
        raise FpewidenError(f"{path} is not a readable PyTorch file (truncated or corrupt)") from None


def save_pt(obj: object, path: Path) -> None:
    """`torch.save`, with a full disk reported as one: torch turns the failed write into a RuntimeError
    ("unexpected pos …"), so the file system is asked whether it is out of space."""
    try:
        torch.save(obj, path)
    except RuntimeError as e:
        stats = os.statvfs(path.parent)
        if stats.f_bavail * stats.f_frsize < (64 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise FpewidenError(f"cannot write {path}: {str(e).splitlines()[0]}") from None


def _open_pickle(path: Path) -> Checkpoint:
    obj = load_pt(path)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and len(obj) <= 3:
            obj = obj[key]
    metadata = obj.pop("fpewiden_metadata", {}) if isinstance(obj, dict) else {}
    if not isinstance(metadata, dict):
        metadata = {}
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FpewidenError(f"{path} does not hold a state dict of tensors")
    tensors = {str(k): v.contiguous() for k, v in obj.items()}
    for k, v in tensors.items():
        if v.dtype not in DTYPE_NAMES:
            raise FpewidenError(f"{path}: tensor {k} has dtype {v.dtype}, which fpewiden does not handle")
    ck = Checkpoint(
        path=path,
        kind="mlp",
        shapes={k: tuple(v.shape) for k, v in tensors.items()},
        dtypes={k: DTYPE_NAMES[v.dtype] for k, v in tensors.items()},
        file_of=dict.fromkeys(tensors, path.with_suffix(".safetensors").name),
        memory=tensors,
        files=[path],
        metadata={str(k): str(v) for k, v in metadata.items()},
    )
    _split_masks(ck, tensors)
    return ck


def _open_hf_dir(path: Path) -> Checkpoint:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FpewidenError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FpewidenError(f"{cfg_path} is not valid JSON") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
            raise FpewidenError(f"{index} is not a valid safetensors index") from None
        files = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    elif (path / "model.packed.safetensors").is_file() or (path / "model.packed.safetensors.index.json").is_file():
        raise _packed_error(path)
    else:
        raise FpewidenError(
            f"{path} has no model.safetensors or model.safetensors.index.json "
            "(convert older .bin checkpoints with transformers' save_pretrained first)"
        )
    ck = Checkpoint(path=path, kind="hf", shapes={}, dtypes={}, file_of={}, config=config)
    for fname in files:
        fpath = path / fname
        if not fpath.is_file():
            raise FpewidenError(f"{path}: shard {fname} named by the index is missing")
        header = read_header(fpath)
        ck.files.append(fpath)
        for n, e in header.entries.items():
            ck.shapes[n], ck.dtypes[n], ck.file_of[n], ck.headers[n] = e.shape, e.dtype, fname, header
    masks = path / MASKS_FILE
    if masks.is_file():
        mh = read_header(masks)
        ck.metadata = mh.metadata
        ck.packed_masks = {n[len(MASK_PREFIX) :]: read_tensor(mh, n) for n in mh.entries if n.startswith(MASK_PREFIX)}
        ck.scales = {n[len(SCALE_PREFIX) :]: read_tensor(mh, n) for n in mh.entries if n.startswith(SCALE_PREFIX)}
    return ck
