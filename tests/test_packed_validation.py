"""Packed matrices someone else wrote: the kernels' one validator (csrc/validate.cc) and its Python mirror
(format.problem) refuse the same matrices in the same words; the torch op refuses inconsistent tensors, before its
first run and after an in-place edit; packed files in both layouts (child ids included) are one line on every
command; the ONNX Runtime op refuses edited models at session creation or at run, in a child process so that a
crash fails the test."""

import dataclasses
import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import ConvertOptions, convert
from fpewiden.errors import FpewidenError
from fpewiden.packed import format as fmt
from fpewiden.packed import kernels, load, ort
from fpewiden.packed.ops import DTYPE_CODES, FORMAT_CODES
from fpewiden.packed.pack import pack_checkpoint
from fpewiden.packed.reader import read_packed
from tests.helpers import write_mlp

runner = CliRunner()
needs_kernels = pytest.mark.skipif(kernels.path() == "torch", reason="the compiled kernels are not built")
needs_op = pytest.mark.skipif(ort.ort_reason() is not None, reason=f"ONNX Runtime op: {ort.ort_reason()}")


def bitmask(rows: int = 9, cols: int = 70, seed: int = 0) -> fmt.PackedMatrix:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < 0.5)
    w[2] = 0
    return fmt.pack_bitmask(w)


def parent(alpha: int = 3, parents: int = 5, cols: int = 70, seed: int = 0) -> fmt.PackedMatrix:
    g = torch.Generator().manual_seed(seed)
    child = torch.randint(alpha, (parents, cols), generator=g)
    w = torch.zeros(parents, alpha, cols)
    w.scatter_(1, child.unsqueeze(1), torch.randn(parents, 1, cols, generator=g))
    pm = fmt.pack_parent(w.view(parents * alpha, cols), alpha)
    assert pm is not None
    return pm


def edit(pm: fmt.PackedMatrix, **change) -> fmt.PackedMatrix:
    """A copy of `pm` with fields or arrays replaced (arrays copied, so `pm` stays valid)."""
    roles = ("values", "bits", "row_ptr", "scales")
    arrays = {k: getattr(pm, k).clone() for k in roles if getattr(pm, k) is not None}
    return dataclasses.replace(pm, **(arrays | change))


def with_bits(pm: fmt.PackedMatrix, index: int, value: int) -> fmt.PackedMatrix:
    bits = pm.bits.clone()
    bits[index] = value
    return edit(pm, bits=bits)


def with_offset(pm: fmt.PackedMatrix, row: int, value: int) -> fmt.PackedMatrix:
    ptr = pm.row_ptr.clone()
    ptr[row] = value
    return edit(pm, row_ptr=ptr)


def swapped(pm: fmt.PackedMatrix) -> fmt.PackedMatrix:
    ptr = pm.row_ptr.clone()
    ptr[[4, 5]] = ptr[[5, 4]]
    return edit(pm, row_ptr=ptr)


def last_row_full(pm: fmt.PackedMatrix) -> fmt.PackedMatrix:
    bits = pm.bits.clone()
    bits[(pm.rows - 1) * pm.stride : (pm.rows - 1) * pm.stride + pm.cols // 8] = 255
    return edit(pm, bits=bits)


def child_three(pm: fmt.PackedMatrix) -> fmt.PackedMatrix:
    """α=3 with one weight's id set to 3 (both planes' bit 0 of parent 1)."""
    bits = pm.bits.clone()
    parents = pm.rows // pm.alpha
    bits[1 * pm.stride] |= 1
    bits[(parents + 1) * pm.stride] |= 1
    return edit(pm, bits=bits)


def corrupt_matrices() -> list[tuple[str, fmt.PackedMatrix, str]]:
    """(what, matrix, the validator's sentence): the issue's cases and every check's own."""
    b, p = bitmask(), parent()
    nnz = b.nnz
    g = torch.Generator().manual_seed(3)
    q, qp = fmt.pack_bitmask(fmt.unpack(b), torch.int8), fmt.pack_parent(fmt.unpack(p), 3, torch.int8)
    d = fmt.pack_dense(torch.randn(6, 40, generator=g), torch.int8)
    q4 = fmt.pack_bitmask(fmt.unpack(b), fmt.INT4, group=16)
    d4 = fmt.pack_dense(torch.randn(6, 41, generator=g), fmt.INT4, group=32)
    return [
        ("int4 without a group", edit(q4, group=0), "int4 values need a group of a power of two from 16 columns"),
        ("int4 group of 24", edit(q4, group=24), "int4 values need a group of a power of two from 16 columns"),
        ("int4 group of 8", edit(q4, group=8), "int4 values need a group of a power of two from 16 columns"),
        ("int4 a scale per row", edit(q4, scales=torch.ones(q4.rows)), "int4 values need one scale per unit and"),
        ("int4 group doubled", edit(q4, group=32), "int4 values need one scale per unit and group"),
        ("int4 values a byte short", edit(q4, values=q4.values[:-1]), "the values are not the rows' bits plus the"),
        ("int4 dense a byte short", edit(d4, values=d4.values[:-1]), "the values are not rows x cols plus the pad"),
        ("int8 with a group", edit(q, group=16), "a group is for int4 values only"),
        ("int8 without scales", edit(q, scales=None), "int8 values need one scale per row (parent: per parent)"),
        ("int8 scales one short", edit(q, scales=q.scales[:-1]), "int8 values need one scale per row"),
        ("parent int8, a scale per row", edit(qp, scales=torch.ones(qp.rows)), "int8 values need one scale per row"),
        ("fp32 with scales", edit(b, scales=torch.ones(b.rows)), "scales are for int8 and int4 values only"),
        ("dense values one short", edit(d, values=d.values[:-1]), "the values are not rows x cols plus the padding"),
        ("dense with bits", edit(d, bits=torch.zeros(8, dtype=torch.uint8)), "a dense matrix has alpha 1, no bits"),
        ("dense with a stride", edit(d, stride=8), "a dense matrix has alpha 1, no bits and no row offsets"),
        ("offset far past the values", with_offset(b, 4, 10**9), "a row's offset difference is not its number"),
        ("two offsets swapped", swapped(b), "a row's offset difference is not its number of bits"),
        ("the last row's bits all set", last_row_full(b), "a row's offset difference is not its number of bits"),
        ("first offset not 0", with_offset(b, 0, 1), "the first row offset is not 0"),
        ("a bit past cols", with_bits(b, 15, 1), "a row has bits past cols"),
        ("values one short", edit(b, values=b.values[:-1], nnz=nnz), "the values are not the rows' bits plus the"),
        ("bits one row short", edit(b, bits=b.bits[: -b.stride]), "the bits are not rows x stride bytes"),
        ("offsets one short", edit(b, row_ptr=b.row_ptr[:-1]), "a bitmask matrix needs rows + 1 row offsets"),
        ("stride of another width", edit(b, stride=24), "the bit stride is not the writer's"),
        ("bitmask with planes", edit(b, alpha=2, planes=1), "a bitmask matrix has alpha 1 and no child-id planes"),
        ("no rows", edit(b, rows=0), "rows and cols must be positive"),
        ("α=3 with one plane", edit(p, planes=1, bits=p.bits[: p.bits.numel() // 2]), "planes is not ceil(log2"),
        ("a child id of 3", child_three(p), "a child id is not below alpha"),
        ("α=5", edit(p, alpha=5), "the parent layout needs 2 <= alpha <= 4"),
        ("rows not a multiple of α", edit(p, rows=p.rows - 1), "rows are not a multiple of alpha"),
        ("a plane bit past cols", with_bits(p, 15, 1 << 7), "a child-id plane has bits past cols"),
        ("parent values one short", edit(p, values=p.values[:-1]), "the values are not parents x cols plus the"),
        ("parent planes short", edit(p, bits=p.bits[: -p.stride]), "the bits are not planes x parents x stride"),
    ]


def run_op(pm: fmt.PackedMatrix, x: torch.Tensor, mode: str = "gemv", isa: str | None = None) -> torch.Tensor:
    return torch.ops.fpewiden.packed_linear(
        x, pm.values, pm.bits, pm.row_ptr, None, pm.rows, pm.cols, FORMAT_CODES[pm.format],
        DTYPE_CODES[pm.values.dtype], pm.alpha, pm.planes, pm.stride, isa or kernels.path(), mode, pm.scales,
        pm.group,
    )  # fmt: skip


def c_problem(pm: fmt.PackedMatrix) -> str | None:
    """What the compiled validator says of `pm`, through the torch op (None: it ran)."""
    try:
        run_op(pm, torch.ones(1, pm.cols))
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        assert "fpewiden: invalid packed matrix: " in msg, msg
        return msg.split("fpewiden: invalid packed matrix: ", 1)[1]
    return None


def test_every_corruption_has_its_own_reason_in_python():
    assert fmt.problem(bitmask()) is None and fmt.problem(parent()) is None
    assert fmt.problem(parent(alpha=2)) is None and fmt.problem(parent(alpha=4)) is None
    for what, pm, why in corrupt_matrices():
        got = fmt.problem(pm)
        assert got is not None and got.startswith(why), (what, got)


@needs_kernels
def test_the_compiled_validator_says_what_the_mirror_says():
    for what, pm, _ in corrupt_matrices():
        assert c_problem(pm) == fmt.problem(pm), what
    for pm in (bitmask(), parent(), parent(alpha=2), parent(alpha=4)):
        assert c_problem(pm) is None


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["bitmask", "parent2", "parent3", "parent4"]), st.integers(0, 10**6), st.integers(0, 255),
       st.sampled_from(["bits", "row_ptr", "values"]))  # fmt: skip
def test_random_edits_are_refused_alike_or_run_in_bounds(kind, where, value, array):
    pm = bitmask(seed=where % 7) if kind == "bitmask" else parent(alpha=int(kind[-1]), seed=where % 7)
    if array == "bits":
        pm = with_bits(pm, where % pm.bits.numel(), value)
    elif array == "row_ptr" and pm.row_ptr is not None:
        pm = with_offset(pm, where % (pm.rows + 1), int(pm.row_ptr[where % (pm.rows + 1)]) + value - 128)
    elif array == "values":
        pm = edit(pm, values=pm.values[: max(0, pm.values.numel() - value % 3)])
    assert c_problem(pm) == fmt.problem(pm)
    if fmt.problem(pm) is None:  # what passed is exact on every path
        x = torch.randn(3, pm.cols)
        want = x.double() @ fmt.unpack(pm).double().T
        for isa in [p for p in kernels.available() if p != "torch"]:
            for mode in ("gemv", "spmm", "dense"):
                got = run_op(pm, x, mode, isa)
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_negative_zero_positions_never_erase_a_weight():
    """A file's -0.0 bookkeeping (which no kernel reads) can only sign zeros: where it overlaps a stored weight,
    the unpacked matrix keeps the weight, as the kernels do (found by the random-edit test below)."""
    w = torch.tensor([[1.0, -0.0, 2.0], [0.0, 3.0, -0.0]])
    pm = fmt.pack_bitmask(w)
    assert pm.negzero is not None and torch.equal(fmt.unpack(pm), w) and fmt.unpack(pm)[0, 1].signbit()
    overlapping = dataclasses.replace(pm, negzero=fmt._pack_bits(torch.ones(2, 3, dtype=torch.bool), pm.stride))
    assert torch.equal(fmt.unpack(overlapping), w)  # 1, 2 and 3 survive; the zeros are -0.0
    assert bool(fmt.unpack(overlapping)[1, 0].signbit())


@needs_kernels
def test_the_op_validates_once_and_again_after_an_in_place_edit():
    pm = bitmask()
    x = torch.randn(2, pm.cols)
    ok = run_op(pm, x)
    torch.testing.assert_close(run_op(pm, x), ok)  # the cached check
    pm.row_ptr[4] += 3  # in place: the version counter moves, so the matrix is checked again
    with pytest.raises(RuntimeError, match="invalid packed matrix: a row's offset difference"):
        run_op(pm, x)
    pm.row_ptr[4] -= 3
    torch.testing.assert_close(run_op(pm, x), ok)
    with pytest.raises(RuntimeError, match="the value type code does not match"):
        torch.ops.fpewiden.packed_linear(
            x, pm.values, pm.bits, pm.row_ptr, None, pm.rows, pm.cols, 0, 1, 1, 0, pm.stride, kernels.path(), "gemv"
        )
    with pytest.raises(RuntimeError, match="invalid packed matrix"):  # unpack goes through the same gate
        p3 = child_three(parent())
        torch.ops.fpewiden.packed_unpack(
            p3.values, p3.bits, None, p3.rows, p3.cols, 1, 0, p3.alpha, p3.planes, p3.stride, "reference"
        )


# ---------------------------------------------------------------- files


def edited_file(src: Path, dst: Path, name: str, role: str, change) -> Path:
    """`src` with one packed array of matrix `name` changed in place by `change(np.ndarray)`."""
    data = bytearray(src.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    entry = json.loads(data[8 : 8 + n])[f"fpewiden_packed.{role}.{name}"]
    a, b = entry["data_offsets"]
    dtype = {"U8": np.uint8, "I64": np.int64, "F32": np.float32}[entry["dtype"]]
    arr = np.frombuffer(bytes(data[8 + n + a : 8 + n + b]), dtype=dtype).copy()
    change(arr)
    data[8 + n + a : 8 + n + b] = arr.tobytes()
    dst.write_bytes(bytes(data))
    return dst


def test_a_child_id_past_alpha_is_one_line_everywhere(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(40, 24, 10))
    fpe = tmp_path / "fpe.safetensors"
    convert(src, fpe, ConvertOptions(alpha=3, outgoing="tied"))
    good = pack_checkpoint(fpe, tmp_path / "p.safetensors")["dst"]
    pc = read_packed(Path(good))
    name = next(n for n, e in pc.entries.items() if e.format == "parent")
    e = pc.entries[name]
    parents = e.rows // e.alpha

    def id_three(bits: np.ndarray) -> None:
        bits[0] |= 1
        bits[parents * e.stride] |= 1

    bad = edited_file(Path(good), tmp_path / "bad.safetensors", name, "bits", id_three)
    for args in (["inspect", str(bad)], ["unpack", str(bad), "--out", str(tmp_path / "u.safetensors")]):
        res = runner.invoke(app, args)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.exit_code == 2 and len(lines) == 1, (args, res.output)
        assert lines[0].startswith("error: ") and "a child id is not below alpha" in lines[0], lines
    assert not (tmp_path / "u.safetensors").exists()
    with pytest.raises(FpewidenError, match="a child id is not below alpha"):
        load(bad)


def test_bitmask_files_with_inconsistent_offsets_are_one_line(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(40, 24, 10))
    half = tmp_path / "half.safetensors"
    from fpewiden.convert import Budget

    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    good = Path(pack_checkpoint(half, tmp_path / "p.safetensors")["dst"])
    name = next(iter(read_packed(good).entries))

    def swap(ptr: np.ndarray) -> None:
        ptr[[3, 4]] = ptr[[4, 3]]

    def far(ptr: np.ndarray) -> None:
        ptr[5] = 10**9

    for what, change in (("swapped", swap), ("far", far)):
        bad = edited_file(good, tmp_path / f"{what}.safetensors", name, "row_ptr", change)
        res = runner.invoke(app, ["inspect", str(bad)])
        assert res.exit_code == 2 and "a row's offset difference is not its number of bits" in res.stderr, what
        with pytest.raises(FpewidenError, match="is corrupt"):
            load(bad)


# ---------------------------------------------------------------- ONNX Runtime: edited models


def op_model(pm: fmt.PackedMatrix, fed: bool = False, **attrs) -> bytes:
    """One PackedMatMul node over `pm`; `fed`: the arrays are graph inputs (run-time) instead of initializers."""
    from onnx import TensorProto, helper, numpy_helper

    arrays = {"values": pm.values.numpy(), "bits": pm.bits.numpy()}
    if pm.row_ptr is not None:
        arrays["row_ptr"] = pm.row_ptr.numpy()
    fields = dict(format=pm.format, rows=pm.rows, cols=pm.cols, stride=pm.stride, alpha=pm.alpha, planes=pm.planes)
    node = helper.make_node(ort.OP, ["x", *arrays], ["y"], domain=ort.DOMAIN, **(fields | attrs))
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.uint8): TensorProto.UINT8,
             np.dtype(np.int64): TensorProto.INT64}  # fmt: skip
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", pm.cols])]
    if fed:
        inputs += [helper.make_tensor_value_info(k, types[a.dtype], [a.size]) for k, a in arrays.items()]
    inits = [] if fed else [numpy_helper.from_array(a, k) for k, a in arrays.items()]
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(ort.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


CHILD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np, onnxruntime
    from fpewiden.packed import ort
    for path in sorted(Path(sys.argv[1]).glob("*.onnx")):
        feeds = json.loads(path.with_suffix(".json").read_text())
        feeds = {k: np.array(v, dtype=t) for k, (v, t) in feeds.items()}
        print(path.stem, end=": ", flush=True)
        try:
            s = onnxruntime.InferenceSession(str(path), ort.session_options(1), providers=["CPUExecutionProvider"])
            for batch in (1, 4, 20):  # the decode kernel, then the token-batch kernel
                feeds["x"] = np.ones((batch, int(sys.argv[2])), np.float32)
                s.run(None, feeds)
        except Exception as e:
            print("refused", str(e).splitlines()[0], flush=True)
        else:
            print("ran", flush=True)
    """
)


@needs_op
def test_edited_onnx_models_are_refused_never_run(tmp_path):
    # the ONNX op has no int8 values, scales or dense layout yet (its type constraints refuse them)
    cases = [(what, pm) for what, pm, _ in corrupt_matrices() if pm.rows > 0 and pm.cols == 70]
    cases = [(what, pm) for what, pm in cases if pm.scales is None and pm.values.dtype != torch.int8]
    cases = [c for c in cases if c[0] != "stride of another width"] + [("good", bitmask()), ("good α=3", parent())]
    for i, (_, pm) in enumerate(cases):
        for fed in (False, True):
            stem = tmp_path / f"{i:02d}-{'fed' if fed else 'init'}"
            stem.with_suffix(".onnx").write_bytes(op_model(pm, fed))
            arrays = {"values": pm.values, "bits": pm.bits, "row_ptr": pm.row_ptr} if fed else {}
            feeds = {k: (v.tolist(), str(v.numpy().dtype)) for k, v in arrays.items() if v is not None}
            stem.with_suffix(".json").write_text(json.dumps(feeds))
    # attributes edited, arrays intact: α=3 exported with one plane (the kernels read two), a bitmask's rows
    p = parent()
    (tmp_path / "90-planes.onnx").write_bytes(op_model(edit(p, bits=p.bits[: p.bits.numel() // 2]), planes=1))
    (tmp_path / "91-rows.onnx").write_bytes(op_model(bitmask(), rows=8))
    for f in ("90-planes", "91-rows"):
        (tmp_path / f"{f}.json").write_text("{}")
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), "70"], capture_output=True, text=True)
    assert res.returncode == 0, f"the child died ({res.returncode}) after:\n{res.stdout}\n{res.stderr[-2000:]}"
    outcome = dict(line.split(": ", 1) for line in res.stdout.splitlines())
    names = {f"{i:02d}-{s}": what for i, (what, _) in enumerate(cases) for s in ("init", "fed")}
    for stem, said in outcome.items():
        what = names.get(stem, stem)
        if what.startswith("good"):
            assert said == "ran", (what, said)
        else:
            assert said.startswith("refused") and "invalid packed matrix" in said, (what, said)
    assert len(outcome) == 2 * len(cases) + 2
