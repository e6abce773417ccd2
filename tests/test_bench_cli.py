"""fpewiden bench end to end on small models, and its bad inputs."""

import json
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper
from safetensors.torch import save_file
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.model.chain_mlp import ChainMLP

runner = CliRunner()
DATA = "dnf:inputs=16,clauses=6,literals=3,n=600"


def models(tmp_path: Path) -> list[Path]:
    src = tmp_path / "dense.safetensors"
    save_file(ChainMLP.fresh([16, 8, 6]).tensors(), str(src))
    fpe = tmp_path / "fpe.safetensors"
    convert(src, fpe, ConvertOptions(alpha=2, budget=Budget.parse("0.5")))
    blk = tmp_path / "blk.safetensors"
    convert(src, blk, ConvertOptions(alpha=2, split="shared", outgoing="grouped"))
    return [src, fpe, blk]


def test_bench_writes_table_json_markdown_plot(tmp_path):
    paths = models(tmp_path)
    res = runner.invoke(
        app,
        [
            "bench",
            *map(str, paths),
            "--data",
            DATA,
            "--repeat",
            "5",
            "--warmup",
            "1",
            "--json",
            str(tmp_path / "b.json"),
            "--markdown",
            str(tmp_path / "b.md"),
            "--plot",
            str(tmp_path / "b.png"),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    assert [r["model"] for r in rows] == ["dense", "fpe", "blk"]
    dense, fpe, blk = rows
    assert dense["nnz"] == 16 * 8 + 8 * 6 and fpe["nnz"] == round(0.5 * dense["nnz"])
    assert dense["bytes"]["dense_fp32"] == (16 * 8 + 8 * 6 + 8 + 6) * 4
    assert fpe["bytes"]["dense_fp32"] == (16 * 16 + 16 * 6 + 16 + 6) * 4
    assert blk["bytes"]["block"] is not None and dense["bytes"]["block"] is None
    assert dense["bound_vs_reference"] == 1.0
    for r in rows:
        for eng in ("torch", "ort"):
            for b in ("1", "32"):
                lat = r["latency"][eng][b]
                assert lat["runs"] == 5 and lat["sparse_path"] is False  # exactly --repeat timed runs
                assert lat["items_per_sec"] == pytest.approx(int(b) / (lat["median_ms"] / 1e3))
                assert lat["p90_ms"] >= lat["median_ms"]
    assert all(r["sparse_path_note"].startswith("no sparse kernel ran") for r in rows)
    assert rows[2]["ort_layout"] == "fast" and rows[1]["ort_layout"] == "dense"
    assert "Pareto" in (tmp_path / "b.md").read_text()
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_onnx_model(tmp_path):
    src = models(tmp_path)[0]
    onnx_path = tmp_path / "d.onnx"
    assert runner.invoke(app, ["export", str(src), "--out", str(onnx_path)]).exit_code == 0
    res = runner.invoke(
        app,
        [
            "bench",
            str(src),
            str(onnx_path),
            "--data",
            DATA,
            "--repeat",
            "3",
            "--engines",
            "ort",
            "--json",
            str(tmp_path / "b.json"),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    assert rows[0]["metrics"]["accuracy"] == pytest.approx(rows[1]["metrics"]["accuracy"])
    assert rows[0]["bytes"]["dense_fp32"] == rows[1]["bytes"]["dense_fp32"]


def test_bench_counts_a_quantized_onnx_file_as_stored(tmp_path):
    """onnxruntime's quantize_dynamic of the export: its int8 weights are counted (bytes as stored, non-zeros of
    the integer matrices), never as a model of 0 non-zeros."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from fpewiden.benchmark.onnx_weights import initializer_arrays, stored_bytes

    src = models(tmp_path)[0]
    dense, int8 = tmp_path / "d.onnx", tmp_path / "d.int8.onnx"
    assert runner.invoke(app, ["export", str(src), "--out", str(dense)]).exit_code == 0
    quantize_dynamic(str(dense), str(int8), weight_type=QuantType.QInt8)
    res = runner.invoke(app, ["bench", str(src), str(dense), str(int8), "--data", DATA, "--repeat", "3",
                              "--engines", "ort", "--json", str(tmp_path / "b.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    _, f32, i8 = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    arrays = initializer_arrays(onnx.load(str(int8)))
    assert i8["best_format"] == "stored" and i8["best_bytes"] == stored_bytes(arrays)
    assert i8["nnz"] > 0.9 * f32["nnz"]  # the int8 matrices' non-zeros (a weight may round to 0)
    assert f32["best_bytes"] / 4 < i8["best_bytes"] < f32["best_bytes"] / 2  # int8 values, fp32 biases and scales
    assert i8["metrics"]["accuracy"] == pytest.approx(f32["metrics"]["accuracy"], abs=0.05)


def test_bench_builds_the_quantized_competitors_of_the_reference(tmp_path):
    """--engines ort-int8,ort-int4,torch-int8: rows of their own, built from the reference, scored on the same
    data, bytes as stored, timed in their runtime against the reference there (bench adds the reference's ort)."""
    src, fpe, _ = models(tmp_path)
    engines = "torch,ort-int8,ort-int4,torch-int8"
    res = runner.invoke(app, ["bench", str(src), str(fpe), "--data", DATA, "--repeat", "3", "--warmup", "1",
                              "--engines", engines, "--json", str(tmp_path / "b.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    ref, wide, i8, i4, t8 = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    assert [r["model"] for r in (i8, i4, t8)] == ["dense · ORT int8", "dense · ORT 4-bit", "dense · torch int8"]
    assert set(ref["latency"]) == {"torch", "ort"} and set(wide["latency"]) == {"torch"}
    assert set(i8["latency"]) == set(i4["latency"]) == {"ort"} and set(t8["latency"]) == {"torch"}
    assert all("vs_reference" in r["latency"][e]["32"] for r in (i8, i4, t8) for e in r["latency"])
    for r in (i8, i4, t8):
        assert r["best_format"] == "stored" and r["bytes"]["dense_fp32"] == ref["bytes"]["dense_fp32"]
        assert r["neurons"] == ref["neurons"] and r["best_bytes"] < ref["best_bytes"] / 2
        assert r["metrics"]["accuracy"] == pytest.approx(ref["metrics"]["accuracy"], abs=0.1)
    # torch's int8: one int8 byte per weight, 8 bytes of scale and zero point per matrix, fp32 biases
    assert t8["best_bytes"] == (16 * 8 + 8 * 6) + 2 * 8 + (8 + 6) * 4
    onnx_ref = tmp_path / "d.onnx"
    assert runner.invoke(app, ["export", str(src), "--out", str(onnx_ref)]).exit_code == 0
    res = runner.invoke(app, ["bench", str(onnx_ref), "--data", DATA, "--engines", "ort,torch-int8"])
    assert res.exit_code == 2 and "torch-int8 quantizes a torch model" in res.output


def test_bench_measures_packed_files_at_their_stored_bytes(tmp_path):
    """A packed file (fp32 or int8 values) is a model of its own: run by fpewiden's kernels (engine packed),
    scored on the data, counted at exactly the bytes of its arrays, other tensors at fp32 as loaded."""
    from safetensors import safe_open

    from fpewiden.packed.pack import pack_checkpoint

    src, _, _ = models(tmp_path)
    half = tmp_path / "half.safetensors"
    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    f32, i8 = tmp_path / "f32.safetensors", tmp_path / "i8.safetensors"
    pack_checkpoint(half, f32)
    pack_checkpoint(half, i8, "int8")
    res = runner.invoke(app, ["bench", str(half), str(f32), str(i8), "--data", DATA, "--repeat", "3",
                              "--engines", "torch,packed", "--json", str(tmp_path / "b.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    ref, p32, p8 = json.loads((tmp_path / "b.json").read_text())["benchmarks"]
    for row, path in ((p32, f32), (p8, i8)):
        with safe_open(str(path), "pt") as f:  # packed arrays as stored, other weights and biases at fp32
            t = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("fpewiden_mask.")}
        stored = sum(v.nbytes if k.startswith("fpewiden_packed.") else v.numel() * 4 for k, v in t.items())
        assert row["best_format"] == "stored" and row["best_bytes"] == stored
        assert set(row["latency"]) == {"packed"} and row["nnz"] <= ref["nnz"]
    assert p32["metrics"] == pytest.approx(ref["metrics"]) and p32["nnz"] == ref["nnz"]
    assert p8["metrics"]["accuracy"] == pytest.approx(ref["metrics"]["accuracy"], abs=0.05)
    assert p8["best_bytes"] < p32["best_bytes"] / 2
    res = runner.invoke(app, ["bench", str(half), str(i8), "--data", DATA, "--engines", "torch"])
    assert res.exit_code == 2 and "measure it with --engines packed" in res.output


def test_bench_counts_what_spread_layers_read(tmp_path, monkeypatch):
    """On the avx2 kernels an int8 bitmask layer runs its values spread to the dense layout: bench keeps the file's
    stored bytes as the model's size but counts the spread bytes as what each inference reads, and says so; on a
    path that runs the bitmask itself, nothing is added."""
    from fpewiden.packed import kernels
    from fpewiden.packed.pack import pack_checkpoint
    from fpewiden.packed.reader import read_packed

    if "avx2" not in kernels.available():
        pytest.skip("no AVX2 on this CPU")
    src, data = tmp_path / "wide.safetensors", "dnf:inputs=128,clauses=6,literals=3,n=600"
    save_file(ChainMLP.fresh([128, 64, 6]).tensors(), str(src))  # rows long enough for pack to keep the bitmask
    half, i8 = tmp_path / "half.safetensors", tmp_path / "i8.safetensors"
    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    pack_checkpoint(half, i8, "int8")
    assert {e.format for e in read_packed(i8).entries.values()} == {"bitmask"}
    rows = {}
    for path in ("avx2", *({"avx512", "portable"} & set(kernels.available()))):
        monkeypatch.setenv(kernels.ENV, path)
        out = tmp_path / f"{path}.json"
        md = tmp_path / f"{path}.md"
        res = runner.invoke(app, ["bench", str(half), str(i8), "--data", data, "--repeat", "3",
                                  "--engines", "torch,packed", "--json", str(out), "--markdown", str(md)])  # fmt: skip
        assert res.exit_code == 0, res.output
        rows[path] = json.loads(out.read_text())["benchmarks"][1]
        assert rows[path]["packed_kernel"] == path
        for text in (md.read_text(), " ".join(res.output.split())):  # the report and the console's caption
            assert ("spread to the dense layout" in text) == (path == "avx2"), text
    spread = rows.pop("avx2")
    # each bitmask matrix spread reads a byte per weight (and its scales) instead of its values, bits and offsets
    entries = read_packed(i8).entries.values()
    extra = sum(e.rows * e.cols - e.nnz - e.rows * -(-e.cols // 64) * 8 - (e.rows + 1) * 8 for e in entries)
    assert spread["read_bytes"] == spread["best_bytes"] + extra
    for r in rows.values():
        assert "read_bytes" not in r and r["best_bytes"] == spread["best_bytes"]
    for v in spread["latency"]["packed"].values():
        assert v["weight_gb_per_s"] == pytest.approx(spread["read_bytes"] / (v["median_ms"] * 1e6))


def test_bench_bad_inputs(tmp_path):
    src = models(tmp_path)[0]
    res = runner.invoke(app, ["bench", str(src), "--data", "dnf:inputs=20,clauses=6"])
    assert res.exit_code == 2 and "reads 16 input features but" in res.stderr
    res = runner.invoke(app, ["bench", str(src), "--data", DATA, "--engines", "tensorrt"])
    assert res.exit_code == 2 and "unknown engine 'tensorrt'" in res.stderr
    graph = helper.make_graph(
        [helper.make_node("Identity", ["ids"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["b", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "w.onnx"))
    res = runner.invoke(app, ["bench", str(tmp_path / "w.onnx"), "--data", DATA, "--engines", "ort"])
    assert res.exit_code == 2 and "takes inputs ['ids']" in res.stderr


def test_sweep_from_checkpoint(tmp_path):
    src = models(tmp_path)[0]
    reports = [tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.svg"]
    res = runner.invoke(app, ["bench", str(src), "--sweep", "--data", DATA, "--budget", "0.5", "--sweep-out",
                              str(tmp_path / "sweep"), "--json", str(reports[0]), "--markdown", str(reports[1]),
                              "--plot", str(reports[2])])  # fmt: skip
    assert res.exit_code == 0, res.output
    # the sweep's bench also where --json, --markdown and --plot name, and the command says where, in full
    assert f"wrote {reports[0]}, {reports[1]}, {reports[2]}" in res.stdout.replace("\n", "")
    assert json.loads(reports[0].read_text())["benchmarks"] == json.loads((tmp_path / "sweep" / "bench.json")
                                                                         .read_text())["benchmarks"]  # fmt: skip
    assert "Pareto" in reports[1].read_text() and reports[2].read_text().startswith("<?xml")
    result = json.loads((tmp_path / "sweep" / "results.json").read_text())
    labels = [s["model"] for s in result["summary"]]
    assert labels == [
        "dense",
        "magnitude pruning, budget 0.5",
        "FPE α=2 random, budget 0.5",
        "FPE α=4 random, budget 0.5",
    ]
    # on 16 inputs α=8 gives each child 2 incoming weights, all smaller than the copied outgoing ones: at half the
    # budget magnitude pruning would empty the incoming matrix, so the sweep says so and leaves α=8 out
    (gone,) = result["left_out"]
    assert (
        gone["model"] == "FPE α=8 random, budget 0.5" and "leaves layer 0 with no weights in 0.weight" in gone["reason"]
    )
    assert "Left out: FPE α=8" in (tmp_path / "sweep" / "results.md").read_text()
    dense_nnz = result["summary"][0]["nnz"]
    assert all(s["nnz"] == round(0.5 * dense_nnz) for s in result["summary"][1:])
    assert [s["neurons"] for s in result["summary"]] == [8, 8, 16, 32]
    assert len(result["bench"]) == 4 and (tmp_path / "sweep" / "bench.png").is_file()


def test_sweep_refuses_report_paths_before_any_work(tmp_path):
    """A report inside --sweep-out (replaced with it) or a plot format nobody writes: one line, exit 2, nothing
    run."""
    out = tmp_path / "sweep"
    res = runner.invoke(app, ["bench", "--sweep", "polysemantic", "--sweep-out", str(out), "--markdown",
                              str(out / "r.md")])  # fmt: skip
    assert res.exit_code == 2 and not out.exists() and "inside --sweep-out" in res.stderr
    res = runner.invoke(app, ["bench", "--sweep", "polysemantic", "--sweep-out", str(out), "--plot",
                              str(tmp_path / "r.gif")])  # fmt: skip
    assert res.exit_code == 2 and not out.exists() and len(res.stderr.strip().splitlines()) == 1
