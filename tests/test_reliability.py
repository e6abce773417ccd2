"""Wrong results and crashes found by trying fpewiden as a new user: resume with dropout, distillation of causal
models, thread choice, export options, consistent counts, pruned neurons with few inputs."""

import json

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.export.export import export
from fpewiden.inspect import inspect_checkpoint
from fpewiden.io.checkpoint import open_checkpoint
from fpewiden.recipes import train_config
from fpewiden.train.config import TrainConfig
from fpewiden.train.finetune import finetune
from fpewiden.train.trainer import SINGLE_THREAD_WORK, auto_threads, available_cores
from tests.helpers import mlp_state, sentences, tiny_bert, tiny_causal, write_mlp

pytest.importorskip("transformers")
runner = CliRunner()


class Stop(Exception):
    pass


def test_hf_resume_with_dropout_equals_an_uninterrupted_run(tmp_path):
    teacher = tiny_bert(tmp_path / "bert", dropout=0.2)
    student = tmp_path / "student"
    convert(teacher, student, ConvertOptions(alpha=2))
    text = sentences(tmp_path / "s.txt", 60)
    cfg = TrainConfig(epochs=3, lr=1e-3, batch_size=8, device="cpu", seed=1, threads=1)
    finetune(student, str(text), tmp_path / "full", cfg, teacher=teacher)

    def stop_at_epoch_2(metrics):
        if metrics["epoch"] == 2:  # before epoch 2's state is saved: the state file holds epoch 1
            raise Stop

    with pytest.raises(Stop):
        finetune(student, str(text), tmp_path / "part", cfg, teacher=teacher, on_epoch=stop_at_epoch_2)
    assert torch.load(tmp_path / "part.state.pt", weights_only=True)["epoch"] == 1
    finetune(student, str(text), tmp_path / "part", cfg, teacher=teacher, resume=True)
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_models_distil_with_a_tokenizer_without_pad_token(tmp_path, family):
    teacher = tiny_causal(tmp_path / family, family)
    student = tmp_path / "student"
    convert(teacher, student, ConvertOptions(alpha=2, budget=Budget.parse("0.5")))
    text = sentences(tmp_path / "s.txt", 30)
    res = runner.invoke(
        app,
        [
            str(a)
            for a in (
                "finetune",
                student,
                "--teacher",
                teacher,
                "--data",
                text,
                "--out",
                tmp_path / "o",
                "--epochs",
                "1",
            )
        ],
    )
    assert res.exit_code == 0, res.output
    log = json.loads((tmp_path / "o.log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [0, 1] and "cosine" in log["final"]
    assert "before training" in res.stderr  # the held-out metric is shown before the first epoch


def test_threads_follow_the_work():
    assert auto_threads(SINGLE_THREAD_WORK - 1) == 1
    assert auto_threads(SINGLE_THREAD_WORK) == available_cores()


def test_tiny_mlp_trains_on_one_thread(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(16, 8, 6))
    out = tmp_path / "f.safetensors"
    finetune(src, "dnf:inputs=16,clauses=6,n=300", out, TrainConfig(epochs=1, device="cpu"))
    assert json.loads((tmp_path / "f.safetensors.log.json").read_text())["threads"] == 1


def test_distillation_has_its_own_defaults():
    assert (train_config(None, {}, distill=True).lr, train_config(None, {}, distill=True).batch_size) == (1e-4, 32)
    assert (train_config(None, {}).lr, train_config(None, {}).batch_size) == (1e-3, 128)
    assert train_config(None, {"lr": 0.5}, distill=True).lr == 0.5  # a flag still wins


def test_export_honours_the_opset_and_exports_logits_of_causal_models(tmp_path):
    bert = tiny_bert(tmp_path / "bert")
    res = export(bert, tmp_path / "b.onnx", opset=19)
    assert res["opset"] == 19 and res["output"] == "last_hidden_state"
    llama = tiny_causal(tmp_path / "llama")
    res = export(llama, tmp_path / "l.onnx")
    assert res["output"] == "logits" and res["verify"]["max_rel_error"] < 1e-4
    model = onnx.load(str(tmp_path / "l.onnx"))
    assert model.producer_name == "fpewiden"
    dims = [d.dim_value or d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims[-1] == 96  # the vocabulary: logits, not hidden states


def test_convert_and_inspect_count_the_same_per_layer(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 16, 16, 3))
    dst = tmp_path / "c.safetensors"
    report = convert(src, dst, ConvertOptions(alpha=2, budget=Budget.parse("0.5")))
    info = inspect_checkpoint(dst)
    assert [(r["nnz_in_after"], r["nnz_out_after"]) for r in report["layers"]] == [
        (r["nnz_in"], r["nnz_out"]) for r in info["layers"]
    ]
    assert report["nnz_after"] == info["totals"]["nnz"] == round(0.5 * (12 * 16 + 16 * 16 + 16 * 3))
    # the shared matrix (layer 2's weights) is layer 0's outgoing and layer 2's incoming matrix
    assert report["layers"][0]["nnz_out_after"] == report["layers"][1]["nnz_in_after"]


def test_neurons_with_fewer_inputs_than_alpha_get_empty_children(tmp_path):
    sd = mlp_state(widths=(6, 5, 2))
    sd["0.weight"][0] = torch.tensor([0.0, 0.0, 0.7, 0.0, 0.0, 0.0])  # one input
    sd["0.weight"][1] = 0.0  # no input: dead
    save_file(sd, str(tmp_path / "p.safetensors"))
    report = convert(tmp_path / "p.safetensors", tmp_path / "w.safetensors", ConvertOptions(alpha=3))
    assert report["layers"][0]["short_neurons"] == 1
    assert report["nnz_after"] == report["nnz_before"]
    w = open_checkpoint(tmp_path / "w.safetensors")
    m = w.mask("0.weight")
    assert m[0:3].sum(1).tolist() in ([1, 0, 0], [0, 1, 0], [0, 0, 1])  # the one input went to one child
    assert m[3:6].sum() == 0  # children of the dead neuron stay empty


def test_sparse_note_says_what_sparse_storage_cost(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(16, 12, 8))
    conv = tmp_path / "c.safetensors"
    convert(src, conv, ConvertOptions(alpha=2, budget=Budget.parse("0.3")))
    res = export(conv, tmp_path / "c.onnx", layout="sparse")
    ratio = res["sparse_initializer_bytes"] / res["sparse_as_dense_bytes"]
    assert f"{ratio:.2f}×" in res["note"] and ("larger" in res["note"]) == (ratio >= 1)
    res = export(src, tmp_path / "d.onnx", layout="sparse")  # dense weights stored sparse: 3× (values + int64)
    assert "3.00×" in res["note"] and "larger" in res["note"]
