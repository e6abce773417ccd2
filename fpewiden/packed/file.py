"""Packed checkpoints on disk: `fpewiden pack` and `fpewiden unpack`, and the reader the loader and inspect use.

A packed checkpoint is plain safetensors. Every Linear weight that a packed format makes smaller (format.py) is
replaced by its arrays, named by prefix (numpy reads them as they are):

    fpewiden_packed.values.NAME   the values (F32, BF16 or F16), PAD zeros at the end
    fpewiden_packed.bits.NAME     U8: the bitmask rows, or the parent format's child-id planes
    fpewiden_packed.row_ptr.NAME  I64, bitmask only: where each row's values start

and the metadata key `fpewiden.packed` (JSON) says, per NAME, how: format, rows and cols as used in y = W x, the
tensor's stored shape and dtype, whether it was transposed (GPT-2's Conv1D stores W as inputs × outputs), α and
bit planes (parent), bit stride and stored values. Everything else (biases, norms, embeddings, attention left
dense, fpewiden's masks) is copied byte for byte. An MLP file stays one .safetensors; a Hugging Face folder keeps
its config and tokenizer and renames its weight files `*.packed.safetensors`, so transformers cannot load it
half-initialised by mistake: fpewiden.packed.load does.

Peak memory while packing is one weight file's packed matrices.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fpewiden.errors import FpewidenError
from fpewiden.io.atomic import atomic_dir, atomic_file
from fpewiden.io.checkpoint import MASKS_FILE, Checkpoint, open_checkpoint
from fpewiden.io.metadata import FpeMetadata
from fpewiden.io.outputs import check_outputs
from fpewiden.io.provenance import MARKER, Provenance, mark_dir
from fpewiden.io.safetensors_stream import DTYPE_NAMES, DTYPES, Header, StreamingWriter, read_header, read_tensor
from fpewiden.io.write import write_hf_extras
from fpewiden.packed import format as fmt

PACKED_KEY = "fpewiden.packed"
PREFIX = "fpewiden_packed."
SUFFIX = ".packed.safetensors"
INDEX = "model.packed.safetensors.index.json"
PACKED_ONLY = (PACKED_KEY, "fpewiden.packed_from", "fpewiden.written_by")  # metadata the unpacked files drop


@dataclass(frozen=True)
class Entry:
    """How one matrix is stored (the JSON of `fpewiden.packed`, per tensor)."""

    format: str
    rows: int
    cols: int
    shape: list[int]  # the tensor's shape in the unpacked checkpoint
    dtype: str  # the values' safetensors dtype
    source_dtype: str
    transposed: bool
    stride: int
    nnz: int
    alpha: int = 1
    planes: int = 0
    negzero: bool = False  # the matrix stored -0.0 somewhere: `fpewiden_packed.negzero.NAME` says where

    def arrays(self, name: str) -> dict[str, str]:
        """role -> tensor name in the packed file."""
        roles = ["values", "bits", *(["row_ptr"] if self.format == "bitmask" else [])]
        roles += ["negzero"] if self.negzero else []
        return {r: f"{PREFIX}{r}.{name}" for r in roles}


def _entry(pm: fmt.PackedMatrix, shape: tuple[int, ...], source: str, transposed: bool) -> Entry:
    return Entry(pm.format, pm.rows, pm.cols, list(shape), DTYPE_NAMES[pm.dtype], source, transposed, pm.stride,
                 pm.nnz, pm.alpha, pm.planes, pm.negzero is not None)  # fmt: skip


def _arrays(pm: fmt.PackedMatrix) -> dict[str, torch.Tensor]:
    out = {"values": pm.values, "bits": pm.bits}
    if pm.row_ptr is not None:
        out["row_ptr"] = pm.row_ptr
    if pm.negzero is not None:
        out["negzero"] = pm.negzero
    return out


def matrix(entry: Entry, arrays: dict[str, torch.Tensor]) -> fmt.PackedMatrix:
    """The PackedMatrix of an entry, from its arrays (by role)."""
    e = entry
    return fmt.PackedMatrix(e.format, e.rows, e.cols, arrays["values"], arrays["bits"], e.stride, e.nnz,
                            arrays.get("row_ptr"), e.alpha, e.planes, arrays.get("negzero"))  # fmt: skip


def dense(entry: Entry, pm: fmt.PackedMatrix) -> torch.Tensor:
    """The stored tensor back, in its source dtype (bit for bit when the values kept that dtype)."""
    w = fmt.unpack(pm).to(DTYPES[entry.source_dtype])
    return (w.T if entry.transposed else w).contiguous().reshape(entry.shape)


def widened_alphas(ck: Checkpoint) -> dict[str, int]:
    """FPE-widened incoming matrices whose every neuron has α children (the parent format's precondition) -> α."""
    meta = ck.meta
    if not meta.alpha or meta.alpha < 2 or not meta.pairs:
        return {}
    full = {r["name"] for r in meta.layers or [] if r.get("neurons_after") == r.get("neurons_before", 0) * meta.alpha}
    return {w: meta.alpha for p in meta.pairs if p["name"] in full for w in p["in"]}


def candidates(ck: Checkpoint) -> dict[str, bool]:
    """The checkpoint's Linear weights (name -> transposed), the only tensors a packed format replaces."""
    if ck.kind == "mlp":
        from fpewiden.arch.chain import linear_layers

        return {w: False for _, w, _ in linear_layers(ck)}
    from fpewiden.model.skeleton import linear_weights

    return linear_weights(ck)


def _pack_one(ck: Checkpoint, name: str, transposed: bool, alpha: int | None, dtype: torch.dtype | None):
    t = ck.get(name)
    if not t.is_floating_point() or t.dim() != 2:
        return None
    w = (t.T if transposed else t).contiguous()
    value_dtype = dtype or (t.dtype if t.dtype in fmt.DTYPE_CODES else torch.float32)
    return fmt.best(w, value_dtype, alpha)


def pack_checkpoint(
    src: Path,
    dst: Path,
    dtype: str | None = None,
    force: bool = False,
    on_matrix: Callable[[str, int, int], None] | None = None,
    provenance: Provenance | None = None,
    inputs: list[Path] | None = None,
) -> dict:
    """Write the packed form of `src` to `dst`; returns per-matrix formats and bytes. `dtype`: fp32, bf16 or fp16
    values (None: each matrix keeps its own). `on_matrix(name, done, total)` after each candidate matrix.
    `provenance`: what the output records (default: pack, from `src`); `inputs`: what no output may touch."""
    if dtype is not None and dtype not in fmt.DTYPES:
        raise FpewidenError(f"--dtype {dtype!r}: choose fp32, bf16 or fp16")
    if is_packed(src):
        raise FpewidenError(f"{src} is packed already")
    ck = open_checkpoint(src)
    if ck.kind == "mlp" and dst.suffix != ".safetensors":
        raise FpewidenError(f"--out {dst}: a packed MLP is one .safetensors file; name the output *.safetensors")
    provenance = provenance or Provenance("pack", ck.sha256)
    check_outputs([dst], inputs or [src], force, provenance=provenance)
    value_dtype = fmt.DTYPES[dtype] if dtype else None
    kinds = candidates(ck)
    widened = widened_alphas(ck)
    rows: list[dict] = []
    done = [0]

    def pack_file(file: str, out: Path) -> None:
        names = [n for n, f in ck.file_of.items() if f == file]
        packed: dict[str, tuple[Entry, dict[str, torch.Tensor]]] = {}
        for name in names:
            if name not in kinds:
                continue
            pm = _pack_one(ck, name, kinds[name], widened.get(name), value_dtype)
            shape = ck.shapes[name]
            dense_bytes = fmt.dense_bytes(shape[0], shape[1], DTYPES[ck.dtypes[name]])
            if pm is not None:
                packed[name] = (_entry(pm, shape, ck.dtypes[name], kinds[name]), _arrays(pm))
            rows.append({"name": name, "format": pm.format if pm else "dense", "dense_bytes": dense_bytes,
                         "packed_bytes": pm.nbytes if pm else dense_bytes, "nnz": pm.nnz if pm else None})  # fmt: skip
            done[0] += 1
            if on_matrix:
                on_matrix(name, done[0], len(kinds))
        _write(ck, file, names, packed, out, provenance)

    if ck.kind == "mlp":
        with atomic_file(dst) as tmp:
            pack_file(ck.file_of[next(iter(ck.shapes))], tmp)
    else:
        with atomic_dir(dst) as tmp:
            files = sorted(set(ck.file_of.values()))
            for f in files:
                pack_file(f, tmp / packed_name(f))
            write_hf_extras(ck, tmp, ck.config or {}, index=False)
            _packed_index(ck, tmp)
            if (ck.path / MASKS_FILE).is_file():
                shutil.copy2(ck.path / MASKS_FILE, tmp / MASKS_FILE)
            mark_dir(tmp, provenance)
    dense_total = sum(r["dense_bytes"] for r in rows)
    packed_total = sum(r["packed_bytes"] for r in rows)
    return {
        "src": str(src),
        "dst": str(dst),
        "matrices": rows,
        "dense_bytes": dense_total,
        "packed_bytes": packed_total,
    }


def packed_name(file: str) -> str:
    return file[: -len(".safetensors")] + SUFFIX if file.endswith(".safetensors") else file + SUFFIX


def _source_metadata(ck: Checkpoint, file: str) -> dict[str, str]:
    """The metadata of the unpacked file, kept in its packed form so unpack writes it back (the writer aside)."""
    header = next((ck.headers[n] for n, f in ck.file_of.items() if f == file and n in ck.headers), None)
    meta = header.metadata if header is not None else ck.metadata
    return {k: v for k, v in meta.items() if k != "fpewiden.written_by"}


def _write(
    ck: Checkpoint,
    file: str,
    names: list[str],
    packed: dict[str, tuple[Entry, dict[str, torch.Tensor]]],
    out: Path,
    provenance: Provenance,
) -> None:
    """One output file: packed matrices as their arrays, every other tensor copied byte for byte."""
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in names:
        if name in packed:
            entry, arrays = packed[name]
            for role, tname in entry.arrays(name).items():
                layout[tname] = (DTYPE_NAMES[arrays[role].dtype], tuple(arrays[role].shape))
        else:
            layout[name] = (ck.dtypes[name], ck.shapes[name])
    if ck.kind == "mlp":
        masks = {n: t for n, t in ck.packed_masks.items()}
        for n, t in masks.items():
            layout[f"fpewiden_mask.{n}"] = ("U8", tuple(t.shape))
    else:
        masks = {}
    header_meta = _source_metadata(ck, file) | {
        PACKED_KEY: json.dumps({n: asdict(e) for n, (e, _) in packed.items()}),
        "fpewiden.packed_from": file,
        "fpewiden.written_by": json.dumps(provenance.record()),
    }
    writer = StreamingWriter(out, layout, header_meta)
    try:
        for name in names:
            if name in packed:
                entry, arrays = packed[name]
                for role, tname in entry.arrays(name).items():
                    writer.write(tname, arrays[role])
            elif name in ck.headers:
                writer.copy_raw(name, ck.headers[name], name)
            else:
                writer.write(name, ck.get(name))
        for n, t in masks.items():
            writer.write(f"fpewiden_mask.{n}", t)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _packed_index(ck: Checkpoint, folder: Path) -> None:
    """A sharded model's index, with each shard's packed arrays named where they now live."""
    index = ck.path / "model.safetensors.index.json"
    if not index.is_file():
        return
    weight_map = {}
    for f in sorted({packed_name(f) for f in ck.file_of.values()}):
        for name in read_header(folder / f).entries:
            weight_map[name] = f
    data = json.loads(index.read_text())
    data["weight_map"] = weight_map
    data.setdefault("metadata", {})["total_size"] = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / INDEX).write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------- reading


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
            if not n.startswith("fpewiden_mask."):
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
    if e.format not in fmt.FORMATS or e.dtype not in ("F32", "BF16", "F16") or e.source_dtype not in DTYPES:
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
    if values.dtype != e.dtype or len(values.shape) != 1 or stored["bits"].dtype != "U8":
        raise FpewidenError(f"{bad} (an array has the wrong type)")
    if "row_ptr" in stored and (stored["row_ptr"].dtype != "I64" or len(stored["row_ptr"].shape) != 1):
        raise FpewidenError(f"{bad} (an array has the wrong type)")
    # the values' length is all the check needs of them: a meta tensor, so they are not read here
    read = {role: read_tensor(header, arrays[role]).reshape(-1) for role in ("bits", "row_ptr") if role in arrays}
    read["values"] = torch.empty(values.shape, dtype=DTYPES[values.dtype], device="meta")
    why = fmt.problem(matrix(e, read))
    if why is not None:
        raise FpewidenError(f"{bad} ({why})")


def unpack_checkpoint(src: Path, dst: Path, force: bool = False) -> dict:
    """The dense checkpoint back from a packed one: the same tensors, bit for bit where no value was cast."""
    pc = read_packed(src)
    from fpewiden.io.provenance import digest

    provenance = Provenance("unpack", lambda: digest([src]))
    check_outputs([dst], [src], force, provenance=provenance)
    writer = {"fpewiden.written_by": json.dumps(provenance.record())}
    by_file: dict[str, list[str]] = {}
    for n, f in pc.source_file.items():
        by_file.setdefault(f, []).append(n)
    if pc.kind == "mlp":
        if dst.suffix != ".safetensors":
            raise FpewidenError(f"--out {dst}: an MLP unpacks to one .safetensors file")
        masks = [n for n in pc.headers if n.startswith("fpewiden_mask.")]
        with atomic_file(dst) as tmp:
            _write_dense(pc, pc.names(), masks, tmp, next(iter(pc.file_metadata.values())) | writer)
    else:
        with atomic_dir(dst) as tmp:
            for f, names in by_file.items():
                _write_dense(pc, names, [], tmp / f, pc.file_metadata[f] | writer)
            for item in src.iterdir():
                skip = item.name in (INDEX, MARKER, "model.safetensors.index.json") or item.name.endswith(SUFFIX)
                if not skip:
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
            if (src / INDEX).is_file():  # the unpacked folder was sharded (an index, one shard or more)
                index = json.loads((src / INDEX).read_text())
                index["weight_map"] = {n: f for f, names in by_file.items() for n in names}
                index.setdefault("metadata", {})["total_size"] = sum((tmp / f).stat().st_size for f in by_file)
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            mark_dir(tmp, provenance)
    return {"src": str(src), "dst": str(dst), "matrices": len(pc.entries)}


def _write_dense(pc: PackedCheckpoint, names: list[str], masks: list[str], out: Path, meta: dict[str, str]) -> None:
    layout = {}
    for n in names:
        if n in pc.entries:
            e = pc.entries[n]
            layout[n] = (e.source_dtype, tuple(e.shape))
        else:
            entry = pc.headers[n].entries[n]
            layout[n] = (entry.dtype, entry.shape)
    for m in masks:
        entry = pc.headers[m].entries[m]
        layout[m] = (entry.dtype, entry.shape)
    writer = StreamingWriter(out, layout, meta)
    try:
        for n in [*names, *masks]:
            if n in pc.entries:
                writer.write(n, pc.get(n))
            else:
                writer.copy_raw(n, pc.headers[n], n)
        writer.close()
    except BaseException:
        writer.abort()
        raise
