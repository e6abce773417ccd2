"""DATA specs for finetune, run and bench: built-in tasks (`dnf:...`, `digits`) or tensor files (x, y[, x_val, y_val]).

Labels decide the loss: int labels are classes, a 0/1 float matrix is multi-label, other floats are regression.
Every problem with the data is a one-line FpewidenError.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fpewiden.data.dnf import DnfSpec, make_dnf
from fpewiden.data.labels import label_kind
from fpewiden.errors import FpewidenError
from fpewiden.io.checkpoint import load_pt
from fpewiden.io.safetensors_stream import read_header, read_tensor


@dataclass
class Dataset:
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    kind: str
    spec: str
    clauses: list[list[int]] | None = None

    @property
    def n_inputs(self) -> int:
        return self.x.shape[1]

    @property
    def n_outputs(self) -> int:
        if self.kind == "classes":
            return int(max(self.y.max(), self.y_val.max())) + 1
        return self.y.shape[1] if self.y.dim() == 2 else 1

    def describe(self) -> str:
        return (
            f"{self.spec}: {len(self.x)} train / {len(self.x_val)} held-out, {self.n_inputs} inputs, "
            f"{self.kind} with {self.n_outputs} output(s)"
        )


def _split(x: torch.Tensor, y: torch.Tensor, val: float, seed: int) -> tuple[torch.Tensor, ...]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(x) * val))
    v, t = order[:n_val], order[n_val:]
    return x[t], y[t], x[v], y[v]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        raise FpewidenError(f"{path} is a folder; DATA names one .safetensors, .npz or .pt file")
    if not path.is_file():
        raise FpewidenError(f"no such data file: {path}")
    if path.stat().st_size == 0:
        raise FpewidenError(f"data file {path} is empty")
    if path.suffix == ".safetensors":
        header = read_header(path)
        return {n: read_tensor(header, n) for n in header.entries}
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: torch.from_numpy(z[k]) for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            raise FpewidenError(f"data file {path} is not a readable .npz file (truncated, corrupt, pickled)") from None
    if path.suffix in (".pt", ".pth"):
        obj = load_pt(path)
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise FpewidenError(f"{path} must hold a dict of tensors x, y[, x_val, y_val]")
        return obj
    raise FpewidenError(f"unsupported data file {path}: expected .safetensors, .npz or .pt")


def _check_shapes(path: Path, t: dict[str, torch.Tensor]) -> None:
    """Shapes checked before anything indexes them: x (samples, features), one y per sample, finite numbers."""
    for xs, ys in (("x", "y"), ("x_val", "y_val")):
        if xs not in t:
            continue
        x, y = t[xs], t[ys]
        if x.dim() != 2:
            raise FpewidenError(f"{path}: {xs} must be (samples, features); it has shape {list(x.shape)}")
        if y.dim() not in (1, 2) or len(y) != len(x):
            raise FpewidenError(
                f"{path}: {ys} must hold one label (or label vector) per sample; {xs} has {len(x)} samples and "
                f"{ys} has shape {list(y.shape)}"
            )
        if not (x.is_floating_point() or x.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)):
            raise FpewidenError(f"{path}: {xs} has dtype {x.dtype}; expected numbers")


def _from_file(path: Path, seed: int, val: float) -> Dataset:
    t = _read_tensors(path)
    if "x" not in t or "y" not in t:
        raise FpewidenError(f"{path} must hold tensors named x and y (found: {', '.join(sorted(t)) or 'none'})")
    if ("x_val" in t) != ("y_val" in t):
        raise FpewidenError(f"{path} holds only one of x_val and y_val; give both or neither")
    _check_shapes(path, t)
    x, y = t["x"].to(torch.float32), t["y"]
    if y.is_floating_point():
        y = y.to(torch.float32)
    else:
        y = y.to(torch.int64)
    if "x_val" in t:
        xv, yv = t["x_val"].to(torch.float32), t["y_val"].to(y.dtype)
    else:
        x, y, xv, yv = _split(x, y, val, seed) if len(x) >= 2 else (x, y, x, y)
    return Dataset(x, y, xv, yv, label_kind(y), str(path))


def _digits(seed: int, val: float) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return Dataset(*_split(x, y, val, seed), kind="classes", spec="digits")


def _embedded(spec: str) -> Dataset:
    from fpewiden.data.embeddings import load_embedded, parse_embed

    x, y, xt, yt = load_embedded(*parse_embed(spec))
    return Dataset(x, y, xt, yt, "classes", spec)


def data_file(spec: str) -> Path | None:
    """The file a DATA spec reads, if it names one (an input no output may touch)."""
    s = spec.strip()
    if s.startswith("embed:"):
        from fpewiden.data.embeddings import is_text_file

        task = s[len("embed:") :].split(",")[0].strip()
        return Path(task) if is_text_file(task) else None
    if s.startswith("dnf") or s == "digits":
        return None
    return Path(s)


def load_data(spec: str, seed: int = 0, val: float = 0.2) -> Dataset:
    """Resolve a DATA spec and check it is usable for training."""
    s = spec.strip()
    if s == "dnf" or s.startswith("dnf:"):
        dnf = DnfSpec.parse(s, default_seed=seed)
        task = make_dnf(dnf)
        data = Dataset(task.x, task.y, task.x_val, task.y_val, "multilabel", s, task.clause_groups())
    elif s == "digits":
        data = _digits(seed, val)
    elif s.startswith("embed:"):
        data = _embedded(s)
    elif Path(s).suffix in (".safetensors", ".npz", ".pt", ".pth"):
        data = _from_file(Path(s), seed, val)
    else:
        raise FpewidenError(
            f"unknown data spec {spec!r}: expected dnf:key=value,..., digits, embed:trec6|trec50|sst5, "
            "embed:FILE.tsv|.csv (your own text and labels), or a .safetensors/.npz/.pt file"
        )
    validate(data)
    return data


def load_inputs(spec: str, seed: int = 0) -> torch.Tensor:
    """The inputs x of a DATA spec, labels not needed: what calibration reads. A tensor file needs only `x`
    (samples, features); a file with labels, or a built-in task, gives its training inputs."""
    s = spec.strip()
    if Path(s).suffix not in (".safetensors", ".npz", ".pt", ".pth"):
        return load_data(s, seed).x
    t = _read_tensors(Path(s))
    if "x" not in t:
        raise FpewidenError(f"{s} must hold a tensor named x (found: {', '.join(sorted(t)) or 'none'})")
    x = t["x"]
    if x.dim() != 2 or len(x) == 0:
        raise FpewidenError(f"{s}: x must be (samples, features); it has shape {list(x.shape)}")
    if not (x.is_floating_point() or x.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)):
        raise FpewidenError(f"{s}: x has dtype {x.dtype}; expected numbers")
    return x.to(torch.float32)


def validate(data: Dataset) -> None:
    if len(data.x) == 0 or len(data.x_val) == 0:
        raise FpewidenError(f"{data.spec}: no training or held-out samples")
    if data.x.dim() != 2 or len(data.x) != len(data.y) or len(data.x_val) != len(data.y_val):
        raise FpewidenError(f"{data.spec}: x must be (samples, features) with one y per sample")
    if data.x_val.shape[1] != data.x.shape[1]:
        raise FpewidenError(f"{data.spec}: x_val has {data.x_val.shape[1]} features but x has {data.x.shape[1]}")
    if data.kind == "classes":
        if int(data.y.min()) < 0:
            raise FpewidenError(f"{data.spec}: class labels must be non-negative")
        if len(torch.unique(data.y)) < 2:
            raise FpewidenError(f"{data.spec}: the training labels hold a single class; nothing to learn")
    elif data.kind == "multilabel" and bool((data.y == data.y[0]).all()):
        raise FpewidenError(f"{data.spec}: every training label vector is identical; nothing to learn")
