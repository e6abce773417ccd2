"""Every user-facing failure: one line on stderr, exit code 2, no traceback, nothing written."""

import json
import math
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from fpewiden.cli import app
from tests.helpers import mlp_state, write_mlp

runner = CliRunner()


class NotATensor:
    pass


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, fragment, out_dir):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".") or p.name.startswith("out")]
    assert leftovers == [], leftovers


def convert_args(src, tmp_path, *extra):
    return ("convert", src, "--out", tmp_path / "out.safetensors", *extra)


def test_missing_file(tmp_path):
    assert_user_error(run(*convert_args(tmp_path / "nope.safetensors", tmp_path)), "no such file", tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    assert_user_error(run(*convert_args(tmp_path / "e.safetensors", tmp_path)), "is empty", tmp_path)


def test_truncated_safetensors(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors")
    data = src.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(run(*convert_args(tmp_path / "t.safetensors", tmp_path)), "truncated or corrupt", tmp_path)


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "c.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert_user_error(run(*convert_args(tmp_path / "c.safetensors", tmp_path)), "truncated or corrupt", tmp_path)


def test_truncated_pt(tmp_path):
    torch.save(mlp_state(), tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    assert_user_error(run(*convert_args(tmp_path / "t.pt", tmp_path)), "truncated or corrupt", tmp_path)


def test_pickle_with_objects_is_refused(tmp_path):
    torch.save({"0.weight": torch.zeros(2, 2), "evil": NotATensor()}, tmp_path / "x.pt")
    assert_user_error(run(*convert_args(tmp_path / "x.pt", tmp_path)), "refusing to unpickle", tmp_path)


def test_pickle_with_non_tensor_values(tmp_path):
    torch.save(OrderedDict({"0.weight": torch.zeros(2, 2), "step": 3}), tmp_path / "x.pt")
    assert_user_error(run(*convert_args(tmp_path / "x.pt", tmp_path)), "state dict of tensors", tmp_path)


def test_no_expandable_layer(tmp_path):
    save_file({"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4)}, str(tmp_path / "one.safetensors"))
    assert_user_error(run(*convert_args(tmp_path / "one.safetensors", tmp_path)), "no expandable layer", tmp_path)


def test_shapes_dont_chain(tmp_path):
    save_file({"0.weight": torch.randn(8, 3), "2.weight": torch.randn(2, 5)}, str(tmp_path / "s.safetensors"))
    assert_user_error(run(*convert_args(tmp_path / "s.safetensors", tmp_path)), "shapes don't chain", tmp_path)


def test_alpha_below_one(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors")
    assert_user_error(run(*convert_args(src, tmp_path, "--alpha", "0")), "at least 1", tmp_path)


def test_alpha_above_inputs(tmp_path):
    save_file({"0.weight": torch.randn(8, 3), "2.weight": torch.randn(2, 8)}, str(tmp_path / "s.safetensors"))
    assert_user_error(
        run(*convert_args(tmp_path / "s.safetensors", tmp_path, "--alpha", "4")),
        "--alpha 4 exceeds the 3 inputs of layer 0",
        tmp_path,
    )


def test_clause_index_out_of_range(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 8, 3))
    (tmp_path / "c.json").write_text(json.dumps([[0, 1], [2, 40]]))
    res = run(*convert_args(src, tmp_path, "--split", "clause", "--clauses", tmp_path / "c.json"))
    assert_user_error(res, "clause index 40 is out of range", tmp_path)


def test_clause_split_needs_file(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors")
    assert_user_error(run(*convert_args(src, tmp_path, "--split", "clause")), "needs --clauses", tmp_path)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_or_inf_weights(tmp_path, bad):
    sd = mlp_state()
    sd["2.weight"][1, 1] = bad
    save_file(sd, str(tmp_path / "n.safetensors"))
    assert_user_error(run(*convert_args(tmp_path / "n.safetensors", tmp_path)), "NaN or Inf", tmp_path)


def test_unsupported_architecture(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    save_file({"x.weight": torch.zeros(2, 2)}, str(d / "model.safetensors"))
    res = run("convert", d, "--out", tmp_path / "out")
    assert_user_error(res, "unsupported architecture model_type='mamba'; supported: bert", tmp_path)


def test_output_equal_to_input(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors")
    before = src.read_bytes()
    res = run("convert", src, "--out", src)
    assert res.exit_code == 2 and "is the input" in res.stderr
    assert src.read_bytes() == before


def test_bad_budget(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors")
    assert_user_error(run(*convert_args(src, tmp_path, "--budget", "1.5")), "--budget", tmp_path)


def test_inspect_missing(tmp_path):
    res = run("inspect", tmp_path / "missing.safetensors")
    assert res.exit_code == 2 and res.stderr.startswith("error: no such file")


def test_convert_and_inspect_json(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors")
    dst = tmp_path / "w.safetensors"
    res = run("convert", src, "--out", dst, "--alpha", "2", "--budget", "0.5")
    assert res.exit_code == 0, res.output
    res = run("inspect", dst, "--json")
    report = json.loads(res.stdout)
    assert report["fpewiden"]["alpha"] == 2
    assert [r["neurons"] for r in report["layers"]] == [32, 20]
    assert [r["neurons_before"] for r in report["layers"]] == [16, 10]
    dense_nnz = 12 * 16 + 16 * 10 + 10 * 3
    assert report["totals"]["nnz"] == round(0.5 * dense_nnz)
    assert all(0 < r["feature_capacity"] <= 1 for r in report["layers"])
