"""Deployable structures: tied outgoing weights, grouped:G splits, and the fast export of every structure (MLP
chains of any depth, BERT-style and gated FFNs), checked against torch on other inputs than export's own."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file

from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.export.export import export
from fpewiden.inspect import inspect_checkpoint
from fpewiden.model.chain_mlp import ChainMLP
from fpewiden.model.loaded import load_model
from fpewiden.train.config import TrainConfig
from fpewiden.train.finetune import finetune
from tests.helpers import tiny_bert, tiny_causal

DNF = "dnf:inputs=16,clauses=6,literals=3,n=600"


def mlp(tmp_path, widths=(16, 12, 6), act="gelu"):
    src = tmp_path / "dense.safetensors"
    save_file(ChainMLP.fresh(list(widths), act, seed=1).tensors(), str(src), metadata={"fpewiden.activation": act})
    return src


def ort_vs_torch(ckpt, onnx_path, n_in):
    x = torch.randn(5, n_in, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = load_model(ckpt).model(x).numpy()
    got = ort.InferenceSession(str(onnx_path)).run(None, {"x": x.numpy()})[0]
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_tied_outgoing_keeps_the_count_and_the_original_bytes(tmp_path):
    src = mlp(tmp_path, act="relu")
    out = tmp_path / "tied.safetensors"
    report = convert(src, out, ConvertOptions(alpha=2, split="shared", outgoing="tied", activation="relu"))
    assert report["nnz_after"] == report["nnz_before"] == 16 * 12 + 12 * 6  # nothing pruned at budget same
    w = load_file(out)["2.weight"]
    assert w.shape == (6, 24) and torch.equal(w[:, 0::2], w[:, 1::2])  # stored as equal copies (any runtime loads it)
    assert inspect_checkpoint(out)["totals"]["nnz"] == report["nnz_after"]  # counted once
    # the model computes W_out · (child 0 + child 1): the incoming partition sums back to the parent for ReLU only
    # where the children agree in sign, so the function changes; the fast export reproduces it exactly
    export(out, tmp_path / "t.onnx", "fast")
    assert ort_vs_torch(out, tmp_path / "t.onnx", 16) < 1e-5
    proto = onnx.load(str(tmp_path / "t.onnx"))
    floats = sum(np.prod(t.dims) for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    assert floats == 16 * 12 + 12 + 12 * 6 + 6  # exactly the original's weights and biases


def test_fine_tuning_keeps_the_tie(tmp_path):
    src = mlp(tmp_path, act="relu")
    conv = tmp_path / "t.safetensors"
    convert(src, conv, ConvertOptions(alpha=2, split="grouped:3", outgoing="tied", budget=Budget.parse("0.8")))
    out = tmp_path / "f.safetensors"
    finetune(conv, DNF, out, TrainConfig(epochs=2, lr=0.01, device="cpu"))
    before, after = load_file(conv), load_file(out)
    w = after["2.weight"]
    assert torch.equal(w[:, 0::2], w[:, 1::2]) and not torch.equal(w, before["2.weight"])
    assert torch.equal(before["0.weight"] != 0, after["0.weight"] != 0)


@pytest.mark.parametrize(
    "split,outgoing",
    [("shared", "tied"), ("grouped:3", "tied"), ("random", "tied"), ("shared", "grouped"), ("grouped:2", "copy")],
)
def test_fast_export_of_every_structure(tmp_path, split, outgoing):
    src = mlp(tmp_path)
    conv = tmp_path / "c.safetensors"
    convert(
        src,
        conv,
        ConvertOptions(alpha=2, split=split, outgoing=outgoing, activation="gelu", budget=Budget.parse("0.9")),
    )
    res = export(conv, tmp_path / "f.onnx", "fast")
    assert ort_vs_torch(conv, tmp_path / "f.onnx", 16) < 1e-5
    if split != "random":
        assert res["ops"].get("Gather", 0) >= 2  # inputs gathered per block


def test_fast_export_of_a_deep_chain(tmp_path):
    src = mlp(tmp_path, widths=(16, 12, 10, 8, 4))
    conv = tmp_path / "c.safetensors"
    convert(src, conv, ConvertOptions(alpha=2, split="grouped:2", activation="gelu"))
    export(conv, tmp_path / "f.onnx", "fast")
    assert ort_vs_torch(conv, tmp_path / "f.onnx", 16) < 1e-5


def test_fast_layout_refuses_a_structureless_conversion(tmp_path):
    from fpewiden.errors import FpewidenError

    src = mlp(tmp_path)
    conv = tmp_path / "c.safetensors"
    convert(src, conv, ConvertOptions(alpha=2))
    with pytest.raises(FpewidenError, match="needs a structure to exploit"):
        export(conv, tmp_path / "f.onnx", "fast")


def test_tied_chains_refuse_a_tied_hidden_to_hidden_matrix(tmp_path):
    from fpewiden.errors import FpewidenError

    src = mlp(tmp_path, widths=(16, 12, 10, 4))
    with pytest.raises(FpewidenError, match="tie only the last hidden layer"):
        convert(src, tmp_path / "c.safetensors", ConvertOptions(alpha=2, outgoing="tied"))
    report = convert(src, tmp_path / "c.safetensors", ConvertOptions(alpha=2, outgoing="tied", targets=["^2$"]))
    assert report["nnz_after"] == report["nnz_before"]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_hf_fast_export_of_tied_grouped_ffns(tmp_path, family):
    src = tiny_bert(tmp_path / "m", dropout=0.0) if family == "bert" else tiny_causal(tmp_path / "m")
    conv = tmp_path / "c"
    convert(src, conv, ConvertOptions(alpha=2, split="grouped:2", outgoing="tied"))
    cfg = json.loads((conv / "config.json").read_text())
    assert cfg["intermediate_size"] == 64
    dense = export(conv, tmp_path / "d.onnx", "dense")
    fast = export(conv, tmp_path / "f.onnx", "fast")
    assert fast["verify"]["max_rel_error"] < 1e-4
    # the widened FFNs move (almost) the original's bytes: 2 layers × (incoming 32·16 + outgoing 16·32) saved
    saved = 2 * 2 * 16 * 32 * 4 * (3 if family == "llama" else 2) // 2
    assert dense["weight_bytes"] - fast["weight_bytes"] >= saved - 1024
