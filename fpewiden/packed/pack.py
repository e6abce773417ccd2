"""`fpewiden pack` and `fpewiden unpack`: a checkpoint's Linear weights into their packed arrays (schema.py) and
back, bit for bit where no value was cast. Peak memory while packing is one weight file's packed matrices.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch

from fpewiden.errors import FpewidenError
from fpewiden.io.atomic import atomic_dir, atomic_file
from fpewiden.io.checkpoint import MASK_PREFIX, MASKS_FILE, SCALE_PREFIX, Checkpoint, open_checkpoint, pack_mask
from fpewiden.io.outputs import check_outputs
from fpewiden.io.provenance import MARKER, Provenance, mark_dir
from fpewiden.io.safetensors_stream import DTYPE_NAMES, DTYPES, StreamingWriter, read_header, read_tensor
from fpewiden.io.write import INDEX as DENSE_INDEX
from fpewiden.io.write import copy_extras, write_hf_extras, write_index, write_masks
from fpewiden.packed import format as fmt
from fpewiden.packed.reader import PackedCheckpoint, is_packed, read_packed
from fpewiden.packed.schema import INDEX, PACKED_KEY, SUFFIX, Entry, arrays_of, entry_of, packed_name


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


def _pattern(pm: fmt.PackedMatrix) -> torch.Tensor:
    """The mask a layout gives back: its structure (bitmask, parent), or every weight for the dense layout (a
    quantized matrix nothing was pruned from keeps its mask of ones)."""
    pattern = fmt.structure(pm)
    return torch.ones(pm.rows, pm.cols, dtype=torch.bool) if pattern is None else pattern


def encodes_mask(ck: Checkpoint, name: str, pm: fmt.PackedMatrix, transposed: bool) -> bool:
    """Whether the checkpoint's mask of `name` is exactly what the packed layout encodes (then it is not stored
    twice: the bitmask, the parent's child planes or the dense layout's every weight give it back)."""
    if name not in ck.packed_masks:
        return False
    pattern = _pattern(pm)
    return torch.equal(pattern.T if transposed else pattern, ck.mask(name))


def mask_of(pm: fmt.PackedMatrix, transposed: bool) -> torch.Tensor:
    """A mask `encodes_mask` left out, bit-packed as the checkpoint stored it."""
    pattern = _pattern(pm)
    return pack_mask((pattern.T if transposed else pattern).contiguous())


def scales_back(pm: fmt.PackedMatrix) -> torch.Tensor:
    """A quantized matrix's scales as convert --quantize records them, (rows, groups): what unpack writes back, so
    packing the unpacked checkpoint again stores the same values."""
    per_unit = pm.scales.view(pm.units, -1)
    return per_unit.repeat_interleave(pm.alpha, dim=0) if pm.format == "parent" else per_unit.clone()


def embedding_tables(ck: Checkpoint) -> list[str]:
    """A Hugging Face model's untied embedding tables: with `--dtype int8` they are stored as int8 rows too, so an
    embedding-heavy model (MiniLM: half its bytes) shrinks as a dynamic-int8 export does."""
    if ck.kind != "hf":
        return []
    from fpewiden.model.skeleton import embedding_weights

    return embedding_weights(ck)


def _table(ck: Checkpoint, name: str) -> tuple[Entry, dict[str, torch.Tensor]]:
    t = ck.get(name)
    pm = fmt.pack_dense(t.to(torch.float32), torch.int8)
    return entry_of(pm, ck.shapes[name], ck.dtypes[name], False), arrays_of(pm)


# How far from an integer a recorded int8 value may read once stored in the checkpoint's dtype: q · s rounded to
# bf16 (8 significant bits) is within 127 · 2⁻⁸ of q; fp16 (11 bits) 127 · 2⁻¹¹; fp32 a few ulps.
GRID_TOLERANCE = {"F32": 1e-3, "F16": 0.07, "BF16": 0.499}


def recorded_scales(ck: Checkpoint, name: str, w: torch.Tensor, group: int | None = None) -> torch.Tensor | None:
    """The scales convert --quantize recorded for `name` (Linear orientation `w`) on the grid pack stores (int8
    rows; `group`: int4 with that many columns per scale), where the weights still lie on them; None where there
    are none, they are another grid's, or the weights moved (fine-tuned)."""
    from fpewiden.quantize import BITS, Grid, on_grid

    s = ck.scales.get(name)
    grid = Grid() if group is None else Grid(BITS["int4"], group)
    if s is None or s.dim() != 2 or s.shape != (w.shape[0], grid.groups(w.shape[1])):
        return None
    tol = GRID_TOLERANCE.get(ck.dtypes[name], 1e-3) * (grid.qmax / 127)
    if not on_grid(w, s, grid, max(tol, 1e-3)):
        return None
    return s[:, 0] if group is None else s


def _pack_one(
    ck: Checkpoint, name: str, transposed: bool, alpha: int | None, dtype: torch.dtype | None, group: int
) -> fmt.PackedMatrix | None:
    t = ck.get(name)
    if not t.is_floating_point() or t.dim() != 2:
        return None
    w = (t.T if transposed else t).contiguous()
    value_dtype = dtype or (t.dtype if t.dtype in fmt.DTYPE_CODES else torch.float32)
    scales = None
    if value_dtype in fmt.QUANTIZED:
        scales = recorded_scales(ck, name, w, group if value_dtype == fmt.INT4 else None)
    return fmt.best(w, value_dtype, alpha, scales, group)


def pack_checkpoint(
    src: Path,
    dst: Path,
    dtype: str | None = None,
    force: bool = False,
    on_matrix: Callable[[str, int, int], None] | None = None,
    provenance: Provenance | None = None,
    inputs: list[Path] | None = None,
    group_size: int | None = None,
) -> dict:
    """Write the packed form of `src` to `dst`; returns per-matrix formats and bytes. `dtype`: fp32, bf16, fp16,
    int8 or int4 values (None: each matrix keeps its own; int8 and int4 store every Linear weight quantized, dense
    ones too; int4 with a scale per row and `group_size` columns). `on_matrix(name, done, total)` after each
    candidate matrix. `provenance`: what the output records (default: pack, from `src`); `inputs`: what no output
    may touch."""
    if dtype is not None and dtype not in fmt.DTYPES:
        raise FpewidenError(f"--dtype {dtype!r}: choose fp32, bf16, fp16, int8 or int4")
    if group_size is not None and dtype != "int4":
        raise FpewidenError("--group-size is for --dtype int4 (int8 has one scale per row)")
    group = fmt.GROUP_SIZE if group_size is None else group_size
    if not (16 <= group <= 1 << 20 and group & (group - 1) == 0):
        raise FpewidenError(f"--group-size {group}: a power of two from 16 (the kernels scale whole vectors)")
    if is_packed(src):
        raise FpewidenError(f"{src} is packed already")
    ck = open_checkpoint(src)
    if ck.kind == "mlp" and dst.suffix != ".safetensors":
        raise FpewidenError(f"--out {dst}: a packed MLP is one .safetensors file; name the output *.safetensors")
    provenance = provenance or Provenance("pack", ck.sha256)
    check_outputs([dst], inputs or [src], force, provenance=provenance)
    value_dtype = fmt.DTYPES[dtype] if dtype else None
    kinds = candidates(ck)
    tables = set(embedding_tables(ck)) if value_dtype in fmt.QUANTIZED else set()
    widened = widened_alphas(ck)
    rows: list[dict] = []
    done = [0]
    elided: set[str] = set()  # masks the packed layouts encode
    quantized: set[str] = set()  # matrices stored with quantized values: their scales are in the packed arrays

    def pack_file(file: str, out: Path) -> None:
        names = [n for n, f in ck.file_of.items() if f == file]
        packed: dict[str, tuple[Entry, dict[str, torch.Tensor]]] = {}
        for name in names:
            if name in tables:  # int8 rows, dequantized on lookup (packed/embedding.py)
                entry, arrays = packed[name] = _table(ck, name)
                dense_bytes = fmt.dense_bytes(*entry.shape, DTYPES[entry.source_dtype])
                stored = sum(a.nbytes for a in arrays.values())
                rows.append({"name": name, "format": "embedding", "dtype": "I8", "dense_bytes": dense_bytes,
                             "packed_bytes": stored, "nnz": None})  # fmt: skip
                continue
            if name not in kinds:
                continue
            pm = _pack_one(ck, name, kinds[name], widened.get(name), value_dtype, group)
            shape = ck.shapes[name]
            dense_bytes = fmt.dense_bytes(shape[0], shape[1], DTYPES[ck.dtypes[name]])
            if pm is not None:
                entry = entry_of(pm, shape, ck.dtypes[name], kinds[name])
                if encodes_mask(ck, name, pm, kinds[name]):
                    entry = replace(entry, mask=True)
                    elided.add(name)
                if pm.dtype in fmt.QUANTIZED:
                    quantized.add(name)
                packed[name] = (entry, arrays_of(pm))
            rows.append({"name": name, "format": pm.format if pm else "dense", "dense_bytes": dense_bytes,
                         "dtype": DTYPE_NAMES[pm.dtype] if pm else ck.dtypes[name],
                         "packed_bytes": pm.nbytes if pm else dense_bytes, "nnz": pm.nnz if pm else None})  # fmt: skip
            done[0] += 1
            if on_matrix:
                on_matrix(name, done[0], len(kinds))
        _write(ck, file, names, packed, out, provenance, elided, quantized)

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
            if (ck.path / MASKS_FILE).is_file():  # fpewiden's metadata lives there: kept, with the other masks
                meta = read_header(ck.path / MASKS_FILE).metadata
                masks = {n: t for n, t in ck.packed_masks.items() if n not in elided}
                write_masks(tmp / MASKS_FILE, masks, meta, {n: t for n, t in ck.scales.items() if n not in quantized})
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
    elided: set[str],
    quantized: set[str],
) -> None:
    """One output file: packed matrices as their arrays, every other tensor copied byte for byte, masks the
    layouts do not encode, recorded scales the packed values do not hold."""
    layout: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in names:
        if name in packed:
            entry, arrays = packed[name]
            for role, tname in entry.arrays(name).items():
                layout[tname] = (DTYPE_NAMES[arrays[role].dtype], tuple(arrays[role].shape))
        else:
            layout[name] = (ck.dtypes[name], ck.shapes[name])
    if ck.kind == "mlp":  # masks and scales inside the one file (Hugging Face folders: in the masks file)
        masks = {f"{MASK_PREFIX}{n}": t for n, t in ck.packed_masks.items() if n not in elided}
        masks.update({f"{SCALE_PREFIX}{n}": t for n, t in ck.scales.items() if n not in quantized})
        for n, t in masks.items():
            layout[n] = (DTYPE_NAMES[t.dtype], tuple(t.shape))
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
            writer.write(n, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _packed_index(ck: Checkpoint, folder: Path) -> None:
    """A sharded model's index, with each shard's packed arrays named where they now live."""
    files = sorted({packed_name(f) for f in ck.file_of.values()})
    weight_map = {name: f for f in files for name in read_header(folder / f).entries}
    write_index(ck.path / DENSE_INDEX, folder / INDEX, weight_map)


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
    # from the bits and scales alone: the values are read once, by the dense writer
    derived = {n: mask_of(pc.layout(n), e.transposed) for n, e in pc.entries.items() if e.mask}
    quantized = {n: scales_back(pc.layout(n)) for n, e in pc.entries.items() if e.dtype in ("I8", "U8")}
    if pc.kind == "mlp":
        if dst.suffix != ".safetensors":
            raise FpewidenError(f"--out {dst}: an MLP unpacks to one .safetensors file")
        stored = {n[len(MASK_PREFIX) :]: pc.stored(n) for n in pc.headers if n.startswith(MASK_PREFIX)}
        scales = {n[len(SCALE_PREFIX) :]: pc.stored(n) for n in pc.headers if n.startswith(SCALE_PREFIX)} | quantized
        with atomic_file(dst) as tmp:
            meta = next(iter(pc.file_metadata.values())) | writer
            _write_dense(pc, pc.names(), dict(sorted((stored | derived).items())), tmp, meta, scales)
    else:
        with atomic_dir(dst) as tmp:
            for f, names in by_file.items():
                _write_dense(pc, names, {}, tmp / f, pc.file_metadata[f] | writer)
            copy_extras(src, tmp, {INDEX, MARKER, DENSE_INDEX, MASKS_FILE}, skip_suffix=SUFFIX)
            if (src / MASKS_FILE).is_file():
                header = read_header(src / MASKS_FILE)
                tensors = {n: read_tensor(header, n) for n in header.entries}
                stored = {n[len(MASK_PREFIX) :]: t for n, t in tensors.items() if n.startswith(MASK_PREFIX)}
                scales = {n[len(SCALE_PREFIX) :]: t for n, t in tensors.items() if n.startswith(SCALE_PREFIX)}
                scales |= quantized
                write_masks(tmp / MASKS_FILE, dict(sorted((stored | derived).items())), header.metadata, scales)
            # a sharded original (an index, one shard or more): its index back, naming the unpacked files
            write_index(src / INDEX, tmp / DENSE_INDEX, {n: f for f, names in by_file.items() for n in names})
            mark_dir(tmp, provenance)
    return {"src": str(src), "dst": str(dst), "matrices": len(pc.entries)}


def _write_dense(
    pc: PackedCheckpoint,
    names: list[str],
    masks: dict[str, torch.Tensor],
    out: Path,
    meta: dict[str, str],
    scales: dict[str, torch.Tensor] | None = None,
) -> None:
    layout = {}
    for n in names:
        if n in pc.entries:
            e = pc.entries[n]
            layout[n] = (e.source_dtype, tuple(e.shape))
        else:
            entry = pc.headers[n].entries[n]
            layout[n] = (entry.dtype, entry.shape)
    extra = {f"{MASK_PREFIX}{n}": t for n, t in masks.items()}
    extra.update({f"{SCALE_PREFIX}{n}": t for n, t in (scales or {}).items()})
    for n, t in extra.items():
        layout[n] = (DTYPE_NAMES[t.dtype], tuple(t.shape))
    writer = StreamingWriter(out, layout, meta)
    try:
        for n in names:
            if n in pc.entries:
                writer.write(n, pc.get(n))
            else:
                writer.copy_raw(n, pc.headers[n], n)
        for n, t in extra.items():
            writer.write(n, t)
        writer.close()
    except BaseException:
        writer.abort()
        raise
