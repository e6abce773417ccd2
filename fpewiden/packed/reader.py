"""Reading a packed checkpoint (schema.py): the entries, where every stored tensor lives, and the check of every
matrix against what the kernels trust (format.problem) before anything may run it; the loader, inspect, export
and unpack read through it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fpewiden.errors import FpewidenError
from fpewiden.io.checkpoint import MASK_PREFIX, MASKS_FILE, SCALE_PREFIX
from fpewiden.io.metadata import FpeMetadata
from fpewiden.io.safetensors_stream import DTYPES, Header, read_header, read_tensor
from fpewiden.packed import format as fmt
from fpewiden.packed.schema import INDEX, PACKED_KEY, PACKED_ONLY, SUFFIX, Entry, dense, matrix


def is_packed(path: Path) -> bool:
    """Whether `path` is a packed checkpoint (an MLP file with `fpewiden.packed`, or a folder of packed files)."""
    if path.is_dir():
        return (path / f"model{SUFFIX}").is_file() or (path / INDEX).is_file()
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return PACKED_KEY in read_header(path).metadata
    except FpewidenError:
        return False


@dataclass
class PackedCheckpoint:
    """A packed checkpoint's tensors: `entries` the packed matrices, `headers` where every stored tensor lives."""

    path: Path
    kind: str  # "mlp" or "hf"
    entries: dict[str, Entry]
    headers: dict[str, Header]  # stored tensor name -> its file
    source_file: dict[str, str]  # logical tensor name -> the unpacked checkpoint's file
    metadata: dict[str, str]
    config: dict | None = None
    file_metadata: dict[str, dict[str, str]] = field(default_factory=dict)  # unpacked file -> its metadata

    @property
    def meta(self) -> FpeMetadata:
        return FpeMetadata.read(self.metadata)

    def names(self) -> list[str]:
        """Every tensor of the unpacked checkpoint (masks left out), in stored order."""
        return list(self.source_file)

    def stored(self, name: str) -> torch.Tensor:
        return read_tensor(self.headers[name], name)

    def packed(self, name: str) -> fmt.PackedMatrix:
        e = self.entries[name]
        return matrix(e, {role: self.stored(t) for role, t in e.arrays(name).items()})

    def layout(self, name: str) -> fmt.PackedMatrix:
        """The packed matrix without its values (a meta tensor of their shape stands in): what its structure and
        scales need, read without the bytes that dominate a file."""
        e = self.entries[name]
        arrays = {role: self.stored(t) for role, t in e.arrays(name).items() if role != "values"}
        header = self.headers[e.arrays(name)["values"]].entries[e.arrays(name)["values"]]
        arrays["values"] = torch.empty(header.shape, dtype=DTYPES[header.dtype], device="meta")
        return matrix(e, arrays)

    def get(self, name: str) -> torch.Tensor:
        """A tensor of the unpacked checkpoint (a packed matrix unpacked to its stored shape and dtype)."""
        if name in self.entries:
            return dense(self.entries[name], self.packed(name))
        return self.stored(name)


def read_packed(path: Path) -> PackedCheckpoint:
    """Open a packed checkpoint; a corrupt or inconsistent one is a one-line error."""
    if not path.exists():
        raise FpewidenError(f"no such file or directory: {path}")
    if path.is_dir():
        index = path / INDEX
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise FpewidenError(f"{index} is not a valid packed index") from None
        elif (path / f"model{SUFFIX}").is_file():
            files = [f"model{SUFFIX}"]
        else:
            raise FpewidenError(f"{path} is not a packed model folder (no model{SUFFIX} or {INDEX})")
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            raise FpewidenError(f"{path}/config.json is missing or not JSON") from None
        kind, paths = "hf", [path / f for f in files]
    else:
        kind, paths, config = "mlp", [path], None
    pc = PackedCheckpoint(path, kind, {}, {}, {}, {}, config)
    for p in paths:
        if not p.is_file():
            raise FpewidenError(f"{path}: packed file {p.name} is missing")
        header = read_header(p)
        raw = header.metadata.get(PACKED_KEY)
        if raw is None:
            raise FpewidenError(f"{p} is not a packed checkpoint (no {PACKED_KEY} metadata)")
        try:
            entries = {n: Entry(**e) for n, e in json.loads(raw).items()}
        except (ValueError, TypeError):
            raise FpewidenError(f"{p}: its {PACKED_KEY} metadata is corrupt") from None
        source = header.metadata.get("fpewiden.packed_from", p.name)
        if kind == "mlp" or not pc.metadata:
            pc.metadata = header.metadata
        arrays = {t for n, e in entries.items() for t in e.arrays(n).values()}
        pc.file_metadata[source] = {k: v for k, v in header.metadata.items() if k not in PACKED_ONLY}
        for n, e in entries.items():
            _check_entry(p, header, n, e)
            pc.entries[n] = e
        for n in header.entries:
            pc.headers[n] = header
        for n in header.entries:
            if n in arrays:
                continue
            if not n.startswith((MASK_PREFIX, SCALE_PREFIX)):
                pc.source_file[n] = source
        for n in entries:
            pc.source_file[n] = source
    if kind == "hf":
        masks = path / MASKS_FILE
        if masks.is_file():
            pc.metadata = read_header(masks).metadata | {k: v for k, v in pc.metadata.items() if k == PACKED_KEY}
    return pc


def _check_entry(path: Path, header: Header, name: str, e: Entry) -> None:
    """Everything a kernel would trust (format.problem, the mirror of the kernels' own validator), checked against
    the stored arrays, so a bad file is one line on every path (never a crash, never a silently wrong weight)."""
    bad = f"{path}: packed matrix {name} is corrupt"
    if e.format not in fmt.FORMATS or e.dtype not in ("F32", "BF16", "F16", "I8", "U8") or e.source_dtype not in DTYPES:
        raise FpewidenError(f"{bad} (unknown format or value type)")
    if len(e.shape) != 2 or sorted(e.shape) != sorted([e.rows, e.cols]) or e.nnz < 0:
        raise FpewidenError(f"{bad} (its shape is not rows x cols)")
    arrays = e.arrays(name)
    if any(t not in header.entries for t in arrays.values()):
        raise FpewidenError(f"{bad} (an array is missing)")
    stored = {role: header.entries[t] for role, t in arrays.items()}
    if e.negzero and (stored["negzero"].dtype != "U8" or stored["negzero"].shape != (e.rows * e.stride,)):
        raise FpewidenError(f"{bad} (its -0.0 positions are not rows x stride bytes)")
    values = stored["values"]
    if values.dtype != e.dtype or len(values.shape) != 1 or ("bits" in stored and stored["bits"].dtype != "U8"):
        raise FpewidenError(f"{bad} (an array has the wrong type)")
    if "scales" in stored and (stored["scales"].dtype != "F32" or len(stored["scales"].shape) != 1):
        raise FpewidenError(f"{bad} (an array has the wrong type)")
    if "row_ptr" in stored and (stored["row_ptr"].dtype != "I64" or len(stored["row_ptr"].shape) != 1):
        raise FpewidenError(f"{bad} (an array has the wrong type)")
    # the values' length is all the check needs of them: a meta tensor, so they are not read here
    read = {r: read_tensor(header, arrays[r]).reshape(-1) for r in ("bits", "row_ptr", "scales") if r in arrays}
    read["values"] = torch.empty(values.shape, dtype=DTYPES[values.dtype], device="meta")
    why = fmt.problem(matrix(e, read))
    if why is not None:
        raise FpewidenError(f"{bad} ({why})")
