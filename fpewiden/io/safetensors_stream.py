"""Read and write safetensors one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape, data_offsets per tensor plus
string `__metadata__`), then raw bytes. Because convert knows every output shape before it computes a single
value, it writes the header first and fills tensors in at their offsets as they are produced: peak memory is
one layer pair, not one checkpoint. Files written here load with the official `safetensors` package.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fpewiden.errors import FpewidenError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * DTYPES[dtype].itemsize


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header; a truncated or corrupt file is a one-line user error."""
    size = path.stat().st_size
    if size == 0:
        raise FpewidenError(f"{path} is empty")
    bad = f"{path} is not a valid safetensors file (truncated or corrupt)"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FpewidenError(bad)
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise FpewidenError(bad)
        try:
            raw = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise FpewidenError(bad) from None
    if not isinstance(raw, dict):
        raise FpewidenError(bad)
    base = 8 + n
    metadata = raw.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    try:
        for name, info in raw.items():
            begin, end = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
            dtype = info["dtype"]
            if dtype not in DTYPES:
                raise FpewidenError(f"{path}: tensor {name} has dtype {dtype}, which fpewiden does not handle")
            if not 0 <= begin <= end or base + end > size or end - begin != nbytes(dtype, shape):
                raise FpewidenError(bad)
            entries[name] = TensorEntry(dtype, shape, base + begin, base + end)
    except (KeyError, TypeError, ValueError):
        raise FpewidenError(bad) from None
    return Header(path, entries, {str(k): str(v) for k, v in metadata.items()})


def read_tensor(header: Header, name: str) -> torch.Tensor:
    """One tensor, read into fresh memory (never an mmap of a file that a later rename could replace)."""
    e = header.entries[name]
    return _read(header.path, e.start, e.end - e.start, e.dtype, e.shape)


def read_rows(header: Header, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor (along its first dimension, clipped to it), reading only their bytes: what
    one rank of a sharded model needs of it."""
    e = header.entries[name]
    rows = e.shape[0]
    start = max(0, min(start, rows))
    stop = max(start, min(stop, rows))
    row_bytes = (e.end - e.start) // max(1, rows)
    return _read(header.path, e.start + start * row_bytes, (stop - start) * row_bytes, e.dtype,
                 (stop - start, *e.shape[1:]))  # fmt: skip


def _read(path: Path, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    buf = bytearray(nbytes)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buf) != len(buf):
            raise FpewidenError(f"{path} is truncated")
    if not buf:
        return torch.empty(shape, dtype=DTYPES[dtype])
    return torch.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)


def _pwrite_all(fd: int, data: torch.Tensor, offset: int) -> None:
    view = memoryview(data.view(torch.uint8).numpy()).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class StreamingWriter:
    """A safetensors file whose layout is fixed up front and whose tensors arrive in any order."""

    def __init__(
        self,
        path: Path,
        layout: dict[str, tuple[str, tuple[int, ...]]],
        metadata: dict[str, str],
        reserve: int = 0,
    ):
        """`reserve` extra header bytes let `set_metadata` record results known only after the tensors."""
        self.path = path
        self.offsets: dict[str, tuple[int, int, str, tuple[int, ...]]] = {}
        self.entries: dict[str, object] = {}
        pos = 0
        for name in sorted(layout, key=lambda k: (-DTYPES[layout[k][0]].itemsize, k)):
            dtype, shape = layout[name]
            size = nbytes(dtype, shape)
            self.entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + size]}
            self.offsets[name] = (pos, pos + size, dtype, shape)
            pos += size
        blob = self._blob(metadata)
        self.header_len = len(blob) + reserve + (-(len(blob) + reserve) % 8)
        self.base = 8 + self.header_len
        self.pending = set(layout)
        self.rows_left = {n: (shape[0] if shape else 1) for n, (_, shape) in layout.items()}
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", self.header_len) + blob.ljust(self.header_len))
        self.file.truncate(self.base + pos)
        self.file.flush()
        self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._inflight: concurrent.futures.Future[None] | None = None

    def _blob(self, metadata: dict[str, str]) -> bytes:
        header = {"__metadata__": metadata, **self.entries} if metadata else dict(self.entries)
        return json.dumps(header, separators=(",", ":")).encode()

    def set_metadata(self, metadata: dict[str, str]) -> None:
        """Rewrite the header's metadata in place; trailing spaces pad it, as the format allows."""
        blob = self._blob(metadata)
        if len(blob) > self.header_len:
            raise AssertionError(f"{self.path}: metadata needs {len(blob)} header bytes, {self.header_len} reserved")
        self.wait()
        self.file.seek(8)
        self.file.write(blob.ljust(self.header_len))

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        """Queue a tensor's bytes, or a block of its leading-dimension rows starting at `row_start`.

        The write overlaps whatever the caller computes next (one write in flight per file).
        """
        start, _end, dtype, shape = self.offsets[name]
        rows = tensor.shape[0] if tensor.dim() else 1
        ok = DTYPE_NAMES[tensor.dtype] == dtype and (
            tuple(tensor.shape) == shape
            if row_start == 0 and rows == (shape[0] if shape else 1)
            else tuple(tensor.shape[1:]) == shape[1:] and row_start + rows <= shape[0]
        )
        if not ok:
            raise AssertionError(
                f"{name}: planned {dtype}{list(shape)}, got {tensor.dtype}{list(tensor.shape)} at row {row_start}"
            )
        row_bytes = nbytes(dtype, shape[1:]) if shape else nbytes(dtype, ())
        data = tensor.detach().contiguous().reshape(-1)
        self.wait()
        if data.numel():
            offset = self.base + start + row_start * row_bytes
            self._inflight = self._io.submit(_pwrite_all, self.file.fileno(), data, offset)
        self.rows_left[name] -= rows
        if self.rows_left[name] <= 0:
            self.pending.discard(name)

    def wait(self) -> None:
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None

    def copy_raw(self, name: str, src: Header, src_name: str) -> None:
        """Copy a tensor's bytes unchanged from another safetensors file, without decoding them."""
        start, _end, dtype, shape = self.offsets[name]
        e = src.entries[src_name]
        if (e.dtype, e.shape) != (dtype, shape):
            raise AssertionError(f"{name}: raw copy of a tensor with another dtype or shape")
        self.wait()
        self.file.seek(self.base + start)
        with open(src.path, "rb") as f:
            f.seek(e.start)
            left = e.end - e.start
            while left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise FpewidenError(f"{src.path} is truncated")
                self.file.write(chunk)
                left -= len(chunk)
        self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            self.abort()
            raise AssertionError(f"{self.path}: tensors never written: {sorted(self.pending)[:5]}")
        self.wait()
        self._io.shutdown()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def abort(self) -> None:
        """Drop the partial file; a failed background write must not hide the error that caused the abort."""
        with contextlib.suppress(Exception):
            self.wait()
        self._io.shutdown()
        self.file.close()
        self.path.unlink(missing_ok=True)
