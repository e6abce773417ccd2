"""Outputs appear whole or not at all: everything is written in a stage folder beside the destination, then
renamed into place.

A stage is named `.NAME.PID.RANDOM.tmp` after its first destination and the process writing it, so a later run to
the same destination can tell a stage whose writer is gone (killed, power lost) from one still being written, and
remove only the former. Staged files get the user's umask (mkdtemp makes 0700 folders, which would otherwise
leak into outputs that others cannot read).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fpewiden.errors import FpewidenError

# failures of the destination's file system (full, over quota, read-only, file too large)
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def user_umask() -> int:
    """The process umask (reading it means setting it; put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fix_mode(path: Path, umask: int) -> None:
    """Give a staged file or folder, and everything in it, the mode a plain open()/mkdir() would have given it
    (copied files, such as a model's tokenizer, would otherwise keep their source's mode)."""
    if path.is_symlink():
        return
    if path.is_dir():
        for item in path.rglob("*"):
            _fix_mode(item, umask) if not item.is_dir() else os.chmod(item, 0o777 & ~umask)
        os.chmod(path, 0o777 & ~umask)
    elif path.is_file():
        os.chmod(path, 0o666 & ~umask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale(dst: Path) -> list[Path]:
    """Remove stages and swap leftovers of `dst` whose writing process no longer exists; returns what went."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.(\d+)\.[^.]+\.(tmp|old)$")
    parent = dst.parent
    if not parent.is_dir():
        return removed
    for item in parent.iterdir():
        m = pattern.match(item.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(item)
    return removed


def _stage_dir(dst: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.{os.getpid()}.", suffix=".tmp", dir=dst.parent))


def _replace(src: Path, dst: Path) -> None:
    """Rename `src` onto `dst`; a folder (or a file replacing a folder) is swapped through a `.old` name."""
    if dst.is_dir() and not dst.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{os.getpid()}.", suffix=".old", dir=dst.parent))
        os.replace(dst, old / "x")
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        if src.is_dir() and dst.exists():
            dst.unlink()
        os.replace(src, dst)


@contextlib.contextmanager
def staged(dsts: list[Path]) -> Iterator[Path]:
    """Yield a stage folder; the caller writes `stage / dst.name` for every destination (files or folders).

    When the block succeeds every staged item is renamed onto its destination in the order given (put the file
    that refers to the others last: a reader never sees a model without its data). Items the caller did not
    create are skipped. On failure nothing outside the stage changes, and the stage is removed.
    """
    stage = _stage_dir(dsts[0])
    umask = user_umask()
    try:
        yield stage
        for dst in dsts:
            item = stage / dst.name
            if item.exists():
                _fix_mode(item, umask)
                _replace(item, dst)
    except OSError as e:
        if e.errno in WRITE_ERRORS:  # name the output, not the stage's inner path
            raise FpewidenError(f"cannot write {dsts[0]}: {e.strerror}; nothing was written") from None
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(dst: Path) -> Iterator[Path]:
    """Yield a temporary path for `dst`; it replaces `dst` only if the block succeeds."""
    with staged([dst]) as stage:
        yield stage / dst.name


@contextlib.contextmanager
def atomic_dir(dst: Path) -> Iterator[Path]:
    """Yield a fresh folder for `dst`; it is swapped in for `dst` only if the block succeeds."""
    with staged([dst]) as stage:
        (stage / dst.name).mkdir()
        yield stage / dst.name
