"""fpewiden bench on Hugging Face models, the whole path, on a tiny BERT and a tiny Llama built offline."""

import json

import pytest
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.export.export import export
from fpewiden.packed.pack import pack_checkpoint
from tests.helpers import WORDS, sentences, tiny_bert, tiny_causal

pytest.importorskip("transformers")
runner = CliRunner()


def bench(*args):
    res = runner.invoke(
        app, ["bench", *map(str, args), "--repeat", "3", "--warmup", "1", "--batch-sizes", "1,4", "--seq-len", "8,16"]
    )
    assert res.exit_code == 0, res.output
    return res


def test_encoder_folders_and_onnx_files_on_text_and_labels(tmp_path):
    src = tiny_bert(tmp_path / "bert", dropout=0.0)
    half = tmp_path / "half"
    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    export(half, tmp_path / "half.onnx", "sparse")
    text = sentences(tmp_path / "t.txt", 40)
    bench(
        src,
        half,
        tmp_path / "half.onnx",
        "--data",
        text,
        "--json",
        tmp_path / "b.json",
        "--markdown",
        tmp_path / "b.md",
        "--plot",
        tmp_path / "b.png",
        "--engines",
        "torch,ort,ort-int8",
    )
    doc = json.loads((tmp_path / "b.json").read_text())
    rows, int8 = doc["benchmarks"][:3], doc["benchmarks"][3]
    assert [r["model"] for r in rows] == ["bert", "half", "half.onnx"]  # a folder and its export, told apart
    # the reference's ORT int8 (quantize_dynamic of its export): a row of its own, bytes as stored
    assert int8["model"] == "bert · ORT int8" and int8["best_format"] == "stored" and set(int8["latency"]) == {"ort"}
    assert int8["best_bytes"] < 0.4 * rows[0]["best_bytes"] and int8["metrics"]["cosine"] > 0.9  # tables left out
    assert "vs_reference" in int8["latency"]["ort"]["4x16"]
    assert rows[0]["metrics"]["cosine"] == pytest.approx(1.0)
    assert rows[1]["metrics"]["cosine"] == pytest.approx(rows[2]["metrics"]["cosine"], abs=1e-4)  # torch = ORT
    assert rows[1]["nnz"] < rows[0]["nnz"]  # the pruned model moves fewer non-zeros
    lat = rows[0]["latency"]["torch"]["4x16"]
    assert lat["runs"] == 3 and lat["batch"] == 4 and lat["seq_len"] == 16
    assert lat["tokens_per_sec"] == pytest.approx(4 * 16 / (lat["median_ms"] / 1e3))
    assert set(rows[2]["latency"]) == {"ort"} and set(rows[0]["latency"]) == {"torch", "ort"}
    # bytes: FFN matrices at half their non-zeros; the grouped counts add up to the total
    ffn0, ffn1 = rows[0]["bytes_by_group"]["ffn"], rows[1]["bytes_by_group"]["ffn"]
    assert ffn1["dense_fp32"] == ffn0["dense_fp32"] and ffn1["csr_idx32"] < ffn0["csr_idx32"]
    assert rows[0]["bound_vs_reference"] == 1.0
    assert doc["seq_lens"] == [8, 16]
    # labelled sentences: one probe on the reference's embeddings, scored on every model
    tsv = tmp_path / "l.tsv"
    tsv.write_text("\n".join(f"{WORDS[i % 30]} {WORDS[(3 * i) % 30]}\t{'q' if i % 2 else 'p'}" for i in range(60)))
    pack_checkpoint(half, tmp_path / "half-i8", "int8")  # a packed folder: a model of its own, on the kernels
    bench(src, half, tmp_path / "half-i8", "--data", tsv, "--json", tmp_path / "p.json",
          "--engines", "torch,packed,torch-int8")  # fmt: skip
    rows = json.loads((tmp_path / "p.json").read_text())["benchmarks"]
    assert rows[2]["model"] == "half-i8" and set(rows[2]["latency"]) == {"packed"}
    assert rows[2]["best_format"] == "stored" and rows[2]["metrics"]["cosine"] > 0.9
    assert rows[3]["model"] == "bert · torch int8" and set(rows[3]["latency"]) == {"torch"}
    assert all(0.0 <= r["metrics"]["probe_accuracy"] <= 1.0 for r in rows)
    assert rows[0]["metrics"]["probe_accuracy"] >= rows[1]["metrics"]["probe_accuracy"] - 0.2


def test_causal_models_report_perplexity_and_agreement(tmp_path):
    src = tiny_causal(tmp_path / "llama")
    half = tmp_path / "half"
    convert(src, half, ConvertOptions(alpha=2, budget=Budget.parse("0.5")))
    export(half, tmp_path / "half.onnx")
    text = sentences(tmp_path / "t.txt", 40)
    bench(src, half, tmp_path / "half.onnx", "--data", text, "--json", tmp_path / "b.json")
    rows = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    ref, torch_half, onnx_half = (r["metrics"] for r in rows)
    assert ref["agreement"] == 1.0 and ref["perplexity"] > 1.0
    assert torch_half["perplexity"] == pytest.approx(onnx_half["perplexity"], rel=1e-3)  # the export is the model
    assert torch_half["agreement"] == pytest.approx(onnx_half["agreement"], abs=1e-3)
    assert "cosine" in torch_half and "cosine" not in onnx_half  # an exported LM carries logits only
    assert rows[0]["bytes_by_group"]["head"]["dense_fp32"] > 0


def test_sweep_of_a_hugging_face_folder_converts_distils_and_benches(tmp_path):
    src = tiny_bert(tmp_path / "bert", dropout=0.0)
    text = sentences(tmp_path / "t.txt", 40)
    out = tmp_path / "sweep"
    args = ["--sweep", "--data", text, "--budget", "0.5", "--calibration", text, "--epochs", "1", "--engines", "torch"]
    bench(src, *args, "--sweep-out", out)
    doc = json.loads((out / "bench.json").read_text())
    rows = doc["benchmarks"]
    assert [r["model"] for r in rows] == ["bert", "alpha1-distilled", "alpha2-distilled", "alpha4-distilled"]
    assert len({r["nnz"] for r in rows[1:]}) == 1 and rows[1]["nnz"] < rows[0]["nnz"]  # one budget for every α
    assert all(str(out) in r["path"] for r in rows[1:])  # named where they are, not where they were staged
    assert (out / "alpha2" / "config.json").is_file() and (out / "alpha2-distilled" / "config.json").is_file()
    assert json.loads((out / "sweep.json").read_text())["alphas"] == [1, 2, 4]
    bench(src, *args, "--sweep-out", out)  # its own output: replaced without --force
    res = runner.invoke(
        app, ["bench", str(src), "--sweep", "--data", str(text), "--epochs", "1", "--sweep-out", str(out)]
    )
    assert res.exit_code == 2 and "pass --calibration FILE" in res.stderr
    res = runner.invoke(app, ["bench", str(src), "--sweep", "--data", "embed:nope", "--sweep-out", str(tmp_path / "x")])
    assert res.exit_code == 2 and not (tmp_path / "x").exists()
