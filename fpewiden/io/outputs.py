"""What fpewiden may write where. Checked for every output of every command before any work starts:

- an output never equals, contains or lies inside an input (checkpoint, teacher, data, clauses, recipe, text);
- an existing output is replaced only if fpewiden wrote it (recognised from what fpewiden puts in every file
  it writes), or with `--force`;
- the output's folder exists (missing folders are created) and really accepts a file (a probe is written and
  removed, so a read-only or full file system fails here, not after an hour of work);
- stages left by a killed earlier run to the same destination are removed.

Recognised as fpewiden's: a folder holding `.fpewiden` (every folder fpewiden writes has one) or, from older
versions, `fpewiden_masks.safetensors` with fpewiden metadata; safetensors with `fpewiden.version` metadata;
`.pt` files whose pickle names `fpewiden_metadata` (read as bytes, never unpickled); ONNX files whose producer
is fpewiden, and their `.data` files; JSON objects with a `fpewiden` key; Markdown with the fpewiden comment;
PNG files whose `Software` text is fpewiden.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

from fpewiden.errors import FpewidenError
from fpewiden.io.atomic import remove_stale

MARKER = ".fpewiden"
MD_MARKER = "<!-- written by fpewiden -->"
PNG_SOFTWARE = "fpewiden"
JSON_KEY = "fpewiden"
META_VERSION = "fpewiden.version"


def _safetensors_is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return False
            head = json.loads(f.read(n))
        return META_VERSION in (head.get("__metadata__") or {})
    except (OSError, ValueError, struct.error, AttributeError):
        return False


def _pt_is_ours(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            return pkl is not None and b"fpewiden_metadata" in z.read(pkl)
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _onnx_is_ours(path: Path) -> bool:
    """ModelProto serialises ir_version (field 1) then producer_name (field 2): the name sits in the first bytes."""
    try:
        with open(path, "rb") as f:
            return b"\x12\x08fpewiden" in f.read(64)
    except OSError:
        return False


def _json_is_ours(path: Path) -> bool:
    try:
        if path.stat().st_size > 256 << 20:
            return False
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and JSON_KEY in data


def _png_is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            while True:
                head = f.read(8)
                if len(head) < 8:
                    return False
                length, kind = struct.unpack(">I4s", head)
                if kind == b"tEXt":
                    key, _, value = f.read(length).partition(b"\0")
                    if key == b"Software" and value.startswith(PNG_SOFTWARE.encode()):
                        return True
                    f.seek(4, os.SEEK_CUR)
                elif kind in (b"IDAT", b"IEND"):
                    return False
                else:
                    f.seek(length + 4, os.SEEK_CUR)
    except (OSError, struct.error):
        return False


def _md_is_ours(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return MD_MARKER in f.read(1 << 20)
    except OSError:
        return False


def written_by_fpewiden(path: Path) -> bool:
    """Whether `path` (which exists) is something fpewiden wrote and may therefore replace."""
    if path.is_symlink():
        return False
    if path.is_dir():
        if (path / MARKER).is_file():
            return True
        masks = path / "fpewiden_masks.safetensors"
        return masks.is_file() and _safetensors_is_ours(masks)
    name = path.name
    if name.endswith(".onnx.data"):
        sibling = path.with_name(name[: -len(".data")])
        return sibling.is_file() and _onnx_is_ours(sibling)
    suffix = path.suffix.lower()
    check = {
        ".safetensors": _safetensors_is_ours,
        ".pt": _pt_is_ours,
        ".pth": _pt_is_ours,
        ".bin": _pt_is_ours,
        ".onnx": _onnx_is_ours,
        ".json": _json_is_ours,
        ".png": _png_is_ours,
        ".md": _md_is_ours,
    }.get(suffix)
    return check is not None and check(path)


def _overlaps(out: Path, inp: Path) -> bool:
    return out == inp or inp in out.parents or out in inp.parents


def _probe(folder: Path, shown: Path) -> None:
    """Create and remove a file in `folder`: the only check that root, read-only mounts and full disks all obey."""
    try:
        fd, name = tempfile.mkstemp(prefix=".fpewiden-probe.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise FpewidenError(f"cannot write {shown}: {e.strerror} ({folder})") from None


def check_outputs(outputs: list[Path], inputs: list[Path], force: bool = False, what: str = "--out") -> None:
    """Refuse, before any work, every output that would destroy something the user owns (see module docstring).

    `outputs` are every path the command will write (sidecars and data files included); `inputs` every path it
    reads. `what` names the option in messages when all outputs hang off one flag.
    """
    ins = [(p, p.resolve()) for p in inputs]
    seen: set[Path] = set()
    for out in outputs:
        target = out.resolve()
        for shown, src in ins:
            if _overlaps(target, src):
                relation = "is" if target == src else ("lies inside" if src in target.parents else "contains")
                raise FpewidenError(f"output {out} {relation} the input {shown}; choose another {what}")
        if out.is_symlink() or out.exists():
            if not force and not written_by_fpewiden(out):
                kind = "folder" if out.is_dir() else "file"
                empty_dir = out.is_dir() and not any(out.iterdir())
                if not empty_dir:
                    raise FpewidenError(
                        f"{out} exists and is a {kind} fpewiden did not write; pass --force to replace it"
                    )
    for out in outputs:  # only once every output passed: missing folders are created (as mkdir -p would)
        target = out.resolve()
        parent = target.parent
        if parent not in seen:
            if not parent.is_dir():
                try:
                    parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise FpewidenError(
                        f"cannot write {out}: cannot create folder {out.parent} ({e.strerror})"
                    ) from None
            _probe(parent, out)
            seen.add(parent)
        remove_stale(target)


def mark_dir(folder: Path, command: str) -> None:
    """Put fpewiden's marker in a folder it writes, so a later run may replace the folder."""
    from fpewiden import __version__

    (folder / MARKER).write_text(json.dumps({"version": __version__, "command": command}) + "\n")


def json_document(payload: dict) -> dict:
    """A JSON object as fpewiden writes it: with the key that lets a later run replace the file."""
    from fpewiden import __version__

    return {JSON_KEY: {"version": __version__}, **payload}
