"""Packed models in ONNX Runtime: the PackedMatMul op on every kernel path, `export --layout packed` (MLP chains,
BERT-style and gated FFNs), bench's `ort-packed` engine, and how the ONNX Runtime headers are obtained."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.errors import FpewidenError
from fpewiden.packed import format as fmt
from fpewiden.packed import kernels, ort, ort_headers
from fpewiden.packed.pack import pack_checkpoint
from fpewiden.packed.reader import read_packed
from tests.helpers import tiny_bert, tiny_causal, write_mlp

runner = CliRunner()
needs_op = pytest.mark.skipif(ort.ort_reason() is not None, reason=f"ONNX Runtime op: {ort.ort_reason()}")
# the export traces fpewiden's torch op, which the pure-torch fallback (no library, or FPEWIDEN_KERNEL=torch) lacks
needs_export = pytest.mark.skipif(
    ort.ort_reason() is not None or kernels.path() == "torch", reason="the packed export needs the compiled kernels"
)
ISAS = [p for p in kernels.available() if p != "torch"]


def initializer(t: torch.Tensor, name: str) -> onnx.TensorProto:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: the raw bytes, typed
        proto = helper.make_tensor(name, TensorProto.BFLOAT16, [t.numel()], t.view(torch.int16).numpy().tobytes(), True)
        return proto
    return numpy_helper.from_array(t.numpy(), name)


def op_model(pm: fmt.PackedMatrix, bias: torch.Tensor | None) -> bytes:
    """One PackedMatMul node over `pm` with X of shape (batch, 2, cols): more than one leading axis."""
    inits = [initializer(pm.values, "values"), initializer(pm.bits, "bits")]
    ins = ["x", "values", "bits", "", ""]
    if pm.row_ptr is not None:
        inits.append(initializer(pm.row_ptr, "row_ptr"))
        ins[3] = "row_ptr"
    if bias is not None:
        inits.append(initializer(bias, "bias"))
        ins[4] = "bias"
    if pm.scales is not None:
        inits.append(initializer(pm.scales, "scales"))
        ins.append("scales")
    while not ins[-1]:
        ins.pop()
    attrs = dict(format=pm.format, rows=pm.rows, cols=pm.cols, stride=pm.stride, alpha=pm.alpha, planes=pm.planes)
    attrs |= {"group": pm.group} if pm.group else {}
    node = helper.make_node(ort.OP, ins, ["y"], domain=ort.DOMAIN, **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, "cols"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2, pm.rows])],
        inits,
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(ort.DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def ragged(fmt_name: str, dtype: torch.dtype) -> tuple[fmt.PackedMatrix, torch.Tensor]:
    """Odd sizes, empty rows (bitmask) or a parent with no weights (parent), values rounded to `dtype`."""
    g = torch.Generator().manual_seed(1)
    if fmt_name == "bitmask":
        w = torch.randn(37, 45, generator=g) * (torch.rand(37, 45, generator=g) < 0.4)
        w[[0, 5, 36]] = 0
        if dtype in fmt.QUANTIZED:
            return fmt.pack_bitmask(w, dtype), w
        return fmt.pack_bitmask(w.to(dtype).float(), dtype), w
    alpha = 3
    parent = torch.randn(13, 45, generator=g)
    parent[4] = 0
    child = torch.randint(alpha, (13, 45), generator=g)
    w = torch.zeros(13, alpha, 45)
    w.scatter_(1, child.unsqueeze(1), parent.unsqueeze(1))
    w = w.view(13 * alpha, 45)
    if dtype in fmt.QUANTIZED:
        return fmt.pack_parent(w, alpha, dtype, group=16), w
    return fmt.pack_parent(w.to(dtype).float(), alpha, dtype), w


@needs_op
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt_name", ["bitmask", "parent"])
def test_the_ort_op_matches_the_dense_reference_on_every_path(monkeypatch, isa, dtype, fmt_name):
    import onnxruntime

    monkeypatch.setenv(kernels.ENV, isa)  # read when the session creates the kernel
    pm, _ = ragged(fmt_name, dtype)
    assert pm is not None
    bias = torch.randn(pm.rows)
    sess = onnxruntime.InferenceSession(op_model(pm, bias), ort.session_options(1), providers=["CPUExecutionProvider"])
    dense = fmt.unpack(pm).double()
    for batch in (1, 4, 9):  # 2 and 8 inputs: the decode kernel; 18: the token-batch kernel
        x = torch.randn(batch, 2, pm.cols)
        got = sess.run(None, {"x": x.numpy()})[0]
        want = (x.double() @ dense.T + bias.double()).numpy()
        assert got.shape == (batch, 2, pm.rows)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_op
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.int8, fmt.INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("fmt_name", ["bitmask", "parent", "dense"])
def test_the_ort_op_runs_int8_and_int4_values_as_the_torch_op(monkeypatch, isa, dtype, fmt_name):
    """Quantized values with their scales: the op computes what the torch op does on the same path (the same
    kernels: bit for bit where both quantize the inputs to int8), and the dequantized product within int8's
    input rounding."""
    import onnxruntime

    from fpewiden.packed.ops import PackedLinear

    monkeypatch.setenv(kernels.ENV, isa)
    if fmt_name == "dense":
        pm = fmt.pack_dense(torch.randn(21, 45, generator=torch.Generator().manual_seed(2)), dtype, group=16)
    else:
        pm, _ = ragged(fmt_name, dtype)
    bias = torch.randn(pm.rows)
    sess = onnxruntime.InferenceSession(op_model(pm, bias), ort.session_options(1), providers=["CPUExecutionProvider"])
    layer = PackedLinear(pm, bias, kernel=isa)
    dense = fmt.unpack(pm).double()
    for batch in (1, 4, 9):  # 2 and 8 inputs: the decode kernel; 18: the token-batch kernel (fp32 inputs)
        x = torch.randn(batch, 2, pm.cols)
        got = sess.run(None, {"x": x.numpy()})[0]
        want = (x.double() @ dense.T + bias.double()).numpy()
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
        if batch * 2 <= 8:
            np.testing.assert_array_equal(got, layer(x, mode="gemv").numpy())


@needs_op
def test_the_op_refuses_inputs_that_do_not_fit():
    import onnxruntime

    pm, _ = ragged("bitmask", torch.float32)
    sess = onnxruntime.InferenceSession(op_model(pm, None), ort.session_options(1), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="X's last axis must be cols = 45"):
        sess.run(None, {"x": np.zeros((1, 2, 44), np.float32)})


def export(args: list) -> dict:
    res = runner.invoke(app, ["export", *map(str, args)])
    assert res.exit_code == 0, res.output
    return res


def onnx_bytes(path: Path) -> int:
    return path.stat().st_size + (p.stat().st_size if (p := path.with_name(path.name + ".data")).exists() else 0)


@needs_export
def test_export_packed_mlps_verify_and_shrink(tmp_path):
    """50% pruning and FPE α=2 (same non-zeros) of a 256-512-256 MLP, packed and exported: the file holds the
    packed bytes and nothing densified (the ratios at Llama-7B shapes are bench/ort_packed.py's), and runs in a
    user's own ONNX Runtime session as docs/packed.md shows."""
    import onnxruntime

    from fpewiden import packed
    from fpewiden.model.loaded import load_model

    src = write_mlp(tmp_path / "src.safetensors", widths=(256, 512, 256))
    half, wide = tmp_path / "half.safetensors", tmp_path / "wide.safetensors"
    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    convert(src, wide, ConvertOptions(alpha=2))
    tied = tmp_path / "tied.safetensors"  # incoming a pure partition: the parent format
    convert(src, tied, ConvertOptions(alpha=2, outgoing="tied"))
    export([src, "--out", tmp_path / "src.onnx"])
    dense = onnx_bytes(tmp_path / "src.onnx")
    for ckpt, limit in ((half, 0.56), (wide, 1.09), (tied, 1.55)):
        pk = tmp_path / f"{ckpt.stem}.packed.safetensors"
        report = pack_checkpoint(ckpt, pk)
        out = tmp_path / f"{ckpt.stem}.onnx"
        export([pk, "--out", out, "--layout", "packed"])
        biases = sum(e.rows for e in read_packed(pk).entries.values()) * 4
        stored = report["packed_bytes"] + biases + 2 * fmt.PAD * 4
        assert stored <= onnx_bytes(out) <= stored + 16384  # the packed arrays, then graph, names, metadata
        assert onnx_bytes(out) <= limit * dense, (ckpt.stem, onnx_bytes(out) / dense)
        model = onnx.load(str(out))
        formats = [a.s.decode() for n in model.graph.node for a in n.attribute if a.name == "format"]
        assert formats == (["parent"] if ckpt == tied else ["bitmask", "bitmask"])  # tied: outgoing stays dense
        opts = onnxruntime.SessionOptions()
        opts.register_custom_ops_library(str(packed.ort_library()))
        sess = onnxruntime.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
        x = torch.randn(11, 256)
        with torch.no_grad():
            want = load_model(ckpt).model.eval()(x).numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()  # fp32 sums in another order


@needs_export
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_export_packed_transformers_models(tmp_path, family):
    src = tiny_bert(tmp_path / "src", dropout=0.0) if family == "bert" else tiny_causal(tmp_path / "src", family)
    wide = tmp_path / "wide"
    convert(src, wide, ConvertOptions(alpha=2, budget=Budget.parse("0.5")))
    assert runner.invoke(app, ["pack", str(wide), "--out", str(tmp_path / "pk")]).exit_code == 0
    out = tmp_path / "m.onnx"
    export([tmp_path / "pk", "--out", out, "--layout", "packed"])
    nodes = [n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node]
    assert nodes.count("PackedMatMul") == (3 if family == "llama" else 2) * 2  # every FFN matrix of 2 layers


@needs_export
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_export_quantized_packed_files_verify(tmp_path, dtype):
    """int8 and int4 packed files (every Linear quantized; a Llama's embedding table int8) export with their
    scales and verify in ONNX Runtime against the torch runtime of the same file."""
    src = write_mlp(tmp_path / "m.safetensors", widths=(40, 24, 10))
    half = tmp_path / "half.safetensors"
    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    llama = tiny_causal(tmp_path / "llama", "llama")
    for ckpt, name in ((half, f"mlp-{dtype}.safetensors"), (llama, f"llama-{dtype}")):
        packed = tmp_path / name
        assert runner.invoke(app, ["pack", str(ckpt), "--out", str(packed), "--dtype", dtype]).exit_code == 0
        out = tmp_path / f"{name}.onnx"
        res = export([packed, "--out", out, "--layout", "packed"])
        assert "verified vs PyTorch" in res.stdout
        graph = onnx.load(str(out), load_external_data=False).graph
        ops = [n for n in graph.node if n.op_type == "PackedMatMul"]
        assert ops and all(len(n.input) == 6 and n.input[5] for n in ops)  # every one with its scales


def test_export_packed_refusals(tmp_path, monkeypatch):
    src = write_mlp(tmp_path / "src.safetensors", widths=(16, 8, 4))
    res = runner.invoke(app, ["export", str(src), "--out", str(tmp_path / "a.onnx"), "--layout", "packed"])
    assert res.exit_code == 2 and "pack it first: fpewiden pack" in res.stderr
    pk = tmp_path / "pk.safetensors"
    half = tmp_path / "half.safetensors"
    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    assert runner.invoke(app, ["pack", str(half), "--out", str(pk)]).exit_code == 0
    res = runner.invoke(
        app, ["export", str(pk), "--out", str(tmp_path / "a.onnx"), "--layout", "packed", "--dtype", "fp16"]
    )
    assert res.exit_code == 2 and "keeps its values' dtype" in res.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(pk.read_bytes()[:300])
    res = runner.invoke(app, ["export", str(bad), "--out", str(tmp_path / "a.onnx"), "--layout", "packed"])
    assert res.exit_code == 2 and "truncated or corrupt" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    with monkeypatch.context() as m:  # the pure-torch fallback has no op for the export to trace
        m.setattr(ort, "ort_reason", lambda: None)
        m.setattr(kernels, "path", lambda: "torch")
        res = runner.invoke(app, ["export", str(pk), "--out", str(tmp_path / "a.onnx"), "--layout", "packed"])
        assert res.exit_code == 2 and "--layout packed needs fpewiden's compiled kernels" in res.stderr
    monkeypatch.setattr(ort, "ort_reason", lambda: "not built (test)")
    res = runner.invoke(app, ["export", str(pk), "--out", str(tmp_path / "a.onnx"), "--layout", "packed"])
    assert res.exit_code == 2 and "the ONNX Runtime packed op is not built (test)" in res.stderr
    assert not (tmp_path / "a.onnx").exists()
    with pytest.raises(FpewidenError, match="packed op is not built"):
        ort.ort_library()


@needs_export
def test_bench_ort_packed_engine(tmp_path, monkeypatch):
    src = write_mlp(tmp_path / "src.safetensors", widths=(16, 32, 6))
    half = tmp_path / "half.safetensors"
    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    args = ["bench", str(src), str(half), "--data", "dnf:inputs=16,clauses=6,n=300", "--batch-sizes", "1,16"]
    res = runner.invoke(
        app, [*args, "--engines", "ort,ort-packed", "--repeat", "3", "--json", str(tmp_path / "b.json")]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    lat = rows[1]["latency"]["ort-packed"]
    assert lat["1"]["sparse_path"] and lat["16"]["runs"] == 3 and not rows[1]["latency"]["ort"]["1"]["sparse_path"]
    assert "ort-packed" in rows[1]["sparse_path_note"]
    pk = tmp_path / "pk.safetensors"
    assert runner.invoke(app, ["pack", str(half), "--out", str(pk)]).exit_code == 0
    export([pk, "--out", tmp_path / "p.onnx", "--layout", "packed"])
    import fpewiden.benchmark.mlp

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the packed export was refused")

    monkeypatch.setattr(fpewiden.benchmark.mlp, "bench", no_loading)
    res = runner.invoke(
        app, ["bench", str(src), str(tmp_path / "p.onnx"), "--data", "dnf:inputs=16,clauses=6", "--engines", "ort"]
    )
    assert res.exit_code == 2 and "is a packed export: bench the checkpoint it was packed from" in res.stderr


# ---------------------------------------------------------------- where the headers come from


def fake_deb(tmp: Path, headers: dict[str, bytes]) -> Path:
    """A real Debian package (built by dpkg-deb) holding `headers` where libonnxruntime-dev keeps them."""
    tree = tmp / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    control = f"Package: {ort_headers.PACKAGE}\nVersion: 1.21.0+dfsg-1\nArchitecture: all\nMaintainer: t <t@t>\n"
    (tree / "DEBIAN/control").write_text(control + "Description: test\n")
    inc = tree / "usr/include/onnxruntime"
    inc.mkdir(parents=True)
    for name, data in headers.items():
        (inc / name).write_bytes(data)
    deb = tmp / f"{ort_headers.PACKAGE}_1.21.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(deb)], check=True, capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")
def test_headers_come_from_apt_get_download(tmp_path, monkeypatch):
    """apt does the fetching and verifying; fpewiden gives it a private index and unpacks what it downloaded."""
    headers = {"onnxruntime_c_api.h": b"#define ORT_API_VERSION 21\n", "onnxruntime_cxx_api.h": b"// api\n"}
    deb = fake_deb(tmp_path, headers)
    bin_dir, log = tmp_path / "bin", tmp_path / "apt.log"
    bin_dir.mkdir()
    apt = bin_dir / "apt-get"  # stands in for apt: logs its arguments, "downloads" the package or fails like apt
    apt.write_text(
        f'#!/bin/sh\necho "$@" >> {log}\n'
        f'[ -n "$APT_FAILS" ] && {{ echo "E: The repository is not signed." >&2; exit 100; }}\n'
        f'case "$*" in *download*) cp {deb} . ;; esac\n'
    )
    apt.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(ort_headers, "mirror", lambda: "http://archive.example/debian")  # apt's configuration
    dest = tmp_path / "inc"
    source = ort_headers.fetch_debian(dest)
    assert f"{ort_headers.PACKAGE} 1.21.0+dfsg-1" in source and "apt-get" in source
    assert (dest / "onnxruntime_cxx_api.h").read_bytes() == headers["onnxruntime_cxx_api.h"]
    assert ort_headers.api_version(dest) == 21
    update, download = log.read_text().splitlines()
    assert update.endswith(" update") and download.endswith(f" download {ort_headers.PACKAGE}/trixie")
    assert "-oDir::Etc::SourceParts=/nonexistent" in update  # the user's own apt state is never touched
    assert "-oDir::State::Lists=" in update and "/var/lib/apt" not in update
    monkeypatch.setenv("APT_FAILS", "1")
    with pytest.raises(RuntimeError, match=r"trixie: apt-get.*The repository is not signed"):
        ort_headers.fetch_debian(tmp_path / "inc2")
    assert not (tmp_path / "inc2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["apt.log", "bin", "inc", "pkg", deb.name])


def test_the_archive_comes_from_apt_configuration_or_the_environment(monkeypatch):
    one_line = "deb http://a.example/debian bookworm main  # comment\ndeb-src http://b.example/debian bookworm main"
    deb822 = "Types: deb\nURIs: http://c.example/debian-security http://c.example/debian\nSuites: bookworm"
    assert ort_headers._uris(one_line) == ["http://a.example/debian"]
    assert ort_headers._uris(deb822) == ["http://c.example/debian-security", "http://c.example/debian"]
    monkeypatch.setenv(ort_headers.MIRROR_ENV, "http://d.example/debian/")
    assert ort_headers.mirror() == "http://d.example/debian"
    monkeypatch.delenv(ort_headers.MIRROR_ENV)
    monkeypatch.setattr(ort_headers.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no apt")))
    monkeypatch.setattr(ort_headers, "_apt_sources", lambda: [])
    with pytest.raises(RuntimeError, match="apt's configuration names no Debian archive"):
        ort_headers.mirror()


def test_setup_says_in_one_line_when_the_op_cannot_be_built(monkeypatch, capsys):
    from fpewiden.packed import build

    def no_headers(*a, **k):
        raise RuntimeError("no ONNX Runtime headers: trixie: offline")

    monkeypatch.setattr(ort_headers, "find", no_headers)
    monkeypatch.setattr(build, "ort_stamp", lambda: None)
    build.main_ort(force=True, verbose=False)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        "setup: ONNX Runtime packed op not built (no ONNX Runtime headers: trixie: offline); "
        "export --layout packed is unavailable"
    ]
