"""Outputs appear whole or not at all: write beside the destination, then rename over it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fpewiden.errors import FpewidenError


def check_output(dst: Path, inputs: list[Path]) -> None:
    """Refuse to overwrite an input, and fail before any work when the destination cannot be written."""
    target = dst.resolve()
    for src in inputs:
        s = src.resolve()
        if target == s or s in target.parents or target in s.parents:
            raise FpewidenError(f"output {dst} would overwrite the input {src}; choose another --out")
    parent = target.parent
    if not parent.is_dir():
        raise FpewidenError(f"cannot write {dst}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise FpewidenError(f"cannot write {dst}: directory {parent} is not writable")


@contextlib.contextmanager
def atomic_file(dst: Path) -> Iterator[Path]:
    """Yield a temporary path next to `dst`; rename it onto `dst` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, dst)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a temporary directory next to `dst`; swap it in for `dst` only if the block succeeds."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
