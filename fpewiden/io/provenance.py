"""Who wrote an output, and from what: the record that decides whether a later run may replace it.

Every file and folder fpewiden writes carries a provenance: the command that wrote it, a digest of the input it
was written from (the source), and what it is in words ("a fine-tuned checkpoint"). An existing output is
replaced without `--force` only by the same command from the same source, i.e. when the new run writes what
the old one would write again. A fine-tuned model copied to where `convert` writes is therefore refused: it is
hours of someone's work, not something convert can reproduce.

Where it is stored, per format (readers never unpickle anything and read at most a header or a prefix):
- folders: `.fpewiden` (JSON);  safetensors: metadata `fpewiden.written_by` (JSON);
- `.pt`: the `fpewiden_metadata` string dict (or `fpewiden_provenance` of a training state), read with
  `torch.load(weights_only=True, mmap=True)`;
- ONNX: the model's doc_string, which protobuf serialises before the graph, so a prefix of the file holds it;
- JSON: the top-level `fpewiden` object;  Markdown: the closing comment;
- plots: a token `fpewiden-provenance:COMMAND:SOURCE` in the format's own metadata (PNG text chunk, SVG
  description, PDF subject, JPEG comment).
Files from fpewiden versions before provenance are recognised as fpewiden's, with no command: they need
`--force`.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

MARKER = ".fpewiden"
META_KEY = "fpewiden.written_by"
META_VERSION = "fpewiden.version"
JSON_KEY = "fpewiden"
MD_PREFIX = "<!-- written by fpewiden"
MD_MARKER = f"{MD_PREFIX} -->"  # reports of bench scripts, which no command replaces
PLOT_TOKEN = "fpewiden-provenance"
PLOT_FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf", ".jpg": "jpeg", ".jpeg": "jpeg"}
_TOKEN = re.compile(rb"fpewiden-provenance:([a-z-]+):([0-9a-f]{8,64})")

WHAT = {
    "convert": "a converted checkpoint",
    "finetune": "a fine-tuned checkpoint",
    "distil": "a distilled checkpoint",
    "run": "the folder of a recipe run",
    "export": "an ONNX export",
    "bench": "a bench report",
    "bench-sweep": "the folder of a bench sweep",
    "pack": "a packed checkpoint",
    "unpack": "an unpacked checkpoint",
}


@dataclass(frozen=True)
class Found:
    """What an existing output says about itself. `command` None: written by an fpewiden from before provenance."""

    command: str | None = None
    source: str | None = None
    what: str | None = None

    def describe(self) -> str:
        if self.command is None:
            return "an output of an earlier fpewiden version (which recorded no source)"
        return f"{self.what or WHAT.get(self.command, 'an output')} written by fpewiden {self.command}"


@dataclass
class Provenance:
    """What a command about to write records, and the test it applies to what it would replace. `source` is
    computed only when needed (an existing output of the same command), since it reads the whole input."""

    command: str
    source_fn: Callable[[], str]
    what: str | None = None
    _source: str | None = field(default=None, repr=False)

    @property
    def source(self) -> str:
        if self._source is None:
            self._source = self.source_fn()
        return self._source

    def known(self, source: str) -> None:
        """The source digest, when the command computed it anyway (convert hashes its input while it streams)."""
        self._source = source

    def record(self) -> dict[str, str]:
        return {"command": self.command, "source": self.source, "what": self.what or WHAT.get(self.command, "")}

    def may_replace(self, found: Found) -> bool:
        return found.command == self.command and found.source == self.source

    def token(self) -> str:
        return f"{PLOT_TOKEN}:{self.command}:{self.source}"


def hash_file(h: hashlib._Hash, path: Path, stop: threading.Event | None = None) -> bool:
    """Feed a file's content to `h`; False when `stop` was set first. A safetensors header counts by its parsed
    content (keys sorted): the safetensors library writes metadata in hash-map order, so two identical saves
    differ in their header bytes."""
    with open(path, "rb") as f:
        if path.suffix == ".safetensors":
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                h.update(json.dumps(json.loads(f.read(n)), sort_keys=True).encode())
            except (struct.error, ValueError, UnicodeDecodeError):
                f.seek(0)
        while chunk := f.read(16 << 20):
            h.update(chunk)
            if stop is not None and stop.is_set():
                return False
    return True


def digest(items: Iterable[Path | str]) -> str:
    """sha256 over inputs in order: a Path's bytes (a folder: its files sorted by relative path, fpewiden's own
    marker left out), or a str as text (a resolved recipe, a DATA spec that is not a file)."""
    h = hashlib.sha256()
    for item in items:
        if isinstance(item, str):
            h.update(b"str\0" + item.encode() + b"\0")
            continue
        p = item
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name != MARKER) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p)).encode() + b"\0" if p.is_dir() else b"file\0")
            hash_file(h, f)
    return h.hexdigest()


def _from_record(rec: object) -> Found:
    if isinstance(rec, dict) and isinstance(rec.get("command"), str):
        src, what = rec.get("source"), rec.get("what")
        return Found(rec["command"], src if isinstance(src, str) else None, what if isinstance(what, str) else None)
    return Found()


def _folder(path: Path) -> Found | None:
    marker = path / MARKER
    if marker.is_file():
        try:
            rec = json.loads(marker.read_text())
        except (OSError, ValueError):
            return Found()
        return _from_record(rec.get("written_by")) if isinstance(rec, dict) else Found()
    masks = path / "fpewiden_masks.safetensors"  # folders of versions before the marker
    return Found() if masks.is_file() and _safetensors(masks) is not None else None


def _safetensors(path: Path) -> Found | None:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return None
    if META_KEY in meta:
        try:
            return _from_record(json.loads(meta[META_KEY]))
        except ValueError:
            return Found()
    return Found() if META_VERSION in meta else None


def _pt(path: Path) -> Found | None:
    try:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            if pkl is None or b"fpewiden_" not in z.read(pkl):
                return None
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    import torch

    try:  # weights_only: plain containers and tensors only; mmap: the tensors are not read
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return Found()
    if not isinstance(obj, dict):
        return Found()
    rec = obj.get("fpewiden_provenance")
    if rec is None and isinstance(obj.get("fpewiden_metadata"), dict):
        raw = obj["fpewiden_metadata"].get(META_KEY)
        try:
            rec = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            rec = None
    return _from_record(rec)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def _onnx(path: Path) -> Found | None:
    """ModelProto's fields 1–6 (ir_version, producer_name, …, doc_string) precede the graph (field 7)."""
    try:
        with open(path, "rb") as f:
            buf = f.read(1 << 16)
    except OSError:
        return None
    fields: dict[int, bytes] = {}
    i = 0
    try:
        while i < len(buf):
            key, i = _varint(buf, i)
            number, wire = key >> 3, key & 7
            if number >= 7 or wire not in (0, 2):
                break
            if wire == 0:
                _, i = _varint(buf, i)
                continue
            n, i = _varint(buf, i)
            fields[number] = buf[i : i + n]
            i += n
    except ValueError:
        return None
    if fields.get(2) != b"fpewiden":
        return None
    m = re.search(rb"written_by=(\{.*?\})", fields.get(6, b""))
    try:
        return _from_record(json.loads(m.group(1))) if m else Found()
    except ValueError:
        return Found()


def _json(path: Path) -> Found | None:
    try:
        if path.stat().st_size > 256 << 20:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or JSON_KEY not in data:
        return None
    tag = data[JSON_KEY]
    return _from_record(tag.get("written_by")) if isinstance(tag, dict) else Found()


def _markdown(path: Path) -> Found | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return None
    m = re.search(r"<!-- written by fpewiden (\{.*?\}) -->", text)
    if m:
        try:
            return _from_record(json.loads(m.group(1)))
        except ValueError:
            return Found()
    return Found() if MD_PREFIX in text else None


def _plot(path: Path) -> Found | None:
    try:
        with open(path, "rb") as f:
            head = f.read(4 << 20)
    except OSError:
        return None
    m = _TOKEN.search(head)
    if m:
        return Found(m.group(1).decode(), m.group(2).decode())
    if head.startswith(b"\x89PNG") and re.search(rb"tEXtSoftware\0fpewiden", head):
        return Found()  # PNGs of earlier versions
    return None


def read(path: Path) -> Found | None:
    """The provenance of an existing output, or None when fpewiden did not write it."""
    if path.is_symlink():
        return None
    if path.is_dir():
        return _folder(path)
    name = path.name
    if name.endswith(".onnx.data"):
        sibling = path.with_name(name[: -len(".data")])
        return _onnx(sibling) if sibling.is_file() else None
    suffix = path.suffix.lower()
    if suffix in PLOT_FORMATS:
        return _plot(path)
    reader = {
        ".safetensors": _safetensors,
        ".pt": _pt,
        ".pth": _pt,
        ".bin": _pt,
        ".onnx": _onnx,
        ".json": _json,
        ".md": _markdown,
    }.get(suffix)
    return reader(path) if reader is not None else None


def mark_dir(folder: Path, provenance: Provenance) -> None:
    """Put fpewiden's marker in a folder it writes, so a later run of the same command may replace the folder."""
    from fpewiden import __version__

    rec = {"version": __version__, "command": provenance.command, "written_by": provenance.record()}
    (folder / MARKER).write_text(json.dumps(rec) + "\n")


def json_document(payload: dict, provenance: Provenance | None = None) -> dict:
    """A JSON object as fpewiden writes it, with the record that lets the same command replace it."""
    from fpewiden import __version__

    tag: dict = {"version": __version__}
    if provenance is not None:
        tag["written_by"] = provenance.record()
    return {JSON_KEY: tag, **payload}


def markdown_marker(provenance: Provenance) -> str:
    return f"{MD_PREFIX} {json.dumps(provenance.record())} -->"


def onnx_doc(provenance: Provenance) -> str:
    return f"written by fpewiden {provenance.command}; written_by={json.dumps(provenance.record())}"
