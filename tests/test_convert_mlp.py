"""convert on MLP state dicts, end to end through files: budgets, masks, metadata, pruned inputs, .pt input."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.io.checkpoint import MASK_PREFIX, open_checkpoint
from tests.helpers import mlp_state, write_mlp


def nnz(sd, names):
    return sum(int((sd[n] != 0).sum()) for n in names)


WEIGHTS = ["0.weight", "2.weight", "4.weight"]


@pytest.mark.parametrize("split", ["random", "feature"])
@pytest.mark.parametrize("alpha", [2, 3, 4])
def test_same_budget_widens_every_hidden_layer(tmp_path, split, alpha):
    src = write_mlp(tmp_path / "m.safetensors")
    dst = tmp_path / "w.safetensors"
    convert(src, dst, ConvertOptions(alpha=alpha, split=split, seed=3))
    before, after = load_file(src), load_file(dst)
    assert nnz(after, WEIGHTS) == nnz(before, WEIGHTS)
    assert after["0.weight"].shape == (16 * alpha, 12)
    assert after["2.weight"].shape == (10 * alpha, 16 * alpha)
    assert after["4.weight"].shape == (3, 10 * alpha)
    assert after["0.bias"].shape == (16 * alpha,)
    meta = safe_open(str(dst), "pt").metadata()
    assert meta["fpewiden.alpha"] == str(alpha) and meta["fpewiden.split"] == split
    assert json.loads(meta["fpewiden.widths"]) == [12, 16 * alpha, 10 * alpha, 3]
    assert meta["fpewiden.activation"] == "relu"
    assert len(meta["fpewiden.source_sha256"]) == 64
    # masks are stored and agree with the non-zeros
    ck = open_checkpoint(dst)
    for n in WEIGHTS:
        assert torch.equal(ck.mask(n), after[n] != 0)
    assert not any(k.startswith(MASK_PREFIX) for k in ck.shapes)


@pytest.mark.parametrize("budget,expected", [("0.5", 0.5), ("0.25", 0.25), ("200", None)])
def test_budget_is_exact(tmp_path, budget, expected):
    src = write_mlp(tmp_path / "m.safetensors")
    dst = tmp_path / "w.safetensors"
    report = convert(src, dst, ConvertOptions(alpha=2, budget=Budget.parse(budget)))
    total = nnz(load_file(src), WEIGHTS)
    want = round(expected * total) if expected else int(budget)
    assert nnz(load_file(dst), WEIGHTS) == want == report["nnz_after"]


def test_pruned_input_keeps_its_zeros(tmp_path):
    sd = mlp_state(widths=(12, 16, 3), density=0.4)
    src = tmp_path / "p.safetensors"
    save_file(sd, str(src))
    dst = tmp_path / "w.safetensors"
    convert(src, dst, ConvertOptions(alpha=2))
    out = load_file(dst)
    kids = (out["0.weight"] != 0).view(16, 2, 12)
    assert not bool((kids & (sd["0.weight"] == 0).unsqueeze(1)).any())
    assert nnz(out, ["0.weight", "2.weight"]) == nnz(sd, ["0.weight", "2.weight"])


def test_reconvert_uses_stored_masks(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 16, 3))
    w2 = tmp_path / "w2.safetensors"
    convert(src, w2, ConvertOptions(alpha=2))
    w4 = tmp_path / "w4.safetensors"
    convert(w2, w4, ConvertOptions(alpha=2, seed=1))
    a, b = load_file(w2), load_file(w4)
    assert b["0.weight"].shape == (64, 12)
    assert nnz(a, ["0.weight", "2.weight"]) == nnz(b, ["0.weight", "2.weight"])


def test_pt_input_is_read_weights_only(tmp_path):
    src = tmp_path / "m.pt"
    torch.save(mlp_state(), src)
    dst = tmp_path / "w.safetensors"
    convert(src, dst, ConvertOptions(alpha=2))
    assert load_file(dst)["0.weight"].shape == (32, 12)


def test_targets_narrow_the_layers(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors")
    dst = tmp_path / "w.safetensors"
    convert(src, dst, ConvertOptions(alpha=2, targets=["^2$"]))
    out = load_file(dst)
    assert out["0.weight"].shape == (16, 12) and out["2.weight"].shape == (20, 16) and out["4.weight"].shape == (3, 20)


def test_clause_split_from_file(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 8, 3))
    dst = tmp_path / "w.safetensors"
    clauses = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    convert(src, dst, ConvertOptions(alpha=2, split="clause", clauses=clauses))
    w = load_file(dst)["0.weight"]
    # before pruning each clause sits in one child; pruning can only remove, so no clause spans two children
    kids = (w != 0).view(8, 2, 12)
    for c in clauses:
        assert int(kids[:, :, c].any(2).sum(1).max()) <= 1


def test_bf16_roundtrip(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in mlp_state().items()}
    src = tmp_path / "b.safetensors"
    save_file(sd, str(src))
    dst = tmp_path / "w.safetensors"
    convert(src, dst, ConvertOptions(alpha=2))
    out = load_file(dst)
    assert out["0.weight"].dtype == torch.bfloat16
    assert nnz(out, WEIGHTS) == nnz(sd, WEIGHTS)


@pytest.mark.parametrize("budget", ["same", "0.5"])
def test_streamed_blocks_equal_one_shot(tmp_path, monkeypatch, budget):
    """Tiny blocks (many block boundaries, ties at the threshold) give the same file content as one block."""
    import fpewiden.fpe.expand as expand_mod

    sd = {k: torch.round(v * 2) / 2 for k, v in mlp_state(widths=(24, 40, 16, 3)).items()}  # many exact ties
    src = tmp_path / "m.safetensors"
    save_file(sd, str(src))
    opts = ConvertOptions(alpha=3, budget=Budget.parse(budget), seed=5)
    convert(src, tmp_path / "a.safetensors", opts)
    monkeypatch.setattr(expand_mod, "_CHUNK", 64)
    convert(src, tmp_path / "b.safetensors", opts)
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
