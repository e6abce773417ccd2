"""The bad-input suite: for every case, exit code 2, one `error:` line on stderr, no traceback, every file in the
workspace (inputs and bystanders) unchanged byte for byte, and nothing new anywhere in it."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from fpewiden.cli import app
from tests.helpers import mlp_state, sentences, tiny_bert, write_mlp

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


class NotATensor:
    pass


def _recipe(path: Path, **kw) -> None:
    raw = {
        "data": "dnf:inputs=12,clauses=4,literals=2,n=200",
        "model": {"hidden": [4]},
        "epochs": 2,
        "warmup_epochs": 1,
    }
    raw.update(kw)
    path.write_text(yaml.safe_dump(raw))


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    """Every input the cases need, built once."""
    d = tmp_path_factory.mktemp("lib")
    write_mlp(d / "mlp.safetensors")
    write_mlp(d / "dnf_mlp.safetensors", widths=(16, 8, 6))
    write_mlp(d / "deep.safetensors", widths=(12, 16, 16, 16, 3))
    good = (d / "mlp.safetensors").read_bytes()
    (d / "empty.safetensors").write_bytes(b"")
    (d / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    (d / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (d / "rnd.pt").write_bytes(bytes((i * 7919 + 13) % 251 for i in range(4000)))
    torch.save(mlp_state(), d / "good.pt")
    (d / "trunc.pt").write_bytes((d / "good.pt").read_bytes()[:700])
    torch.save({"0.weight": torch.zeros(2, 2), "evil": NotATensor()}, d / "obj.pt")
    torch.save({"0.weight": torch.zeros(2, 2), "step": 3}, d / "nontensor.pt")
    save_file({"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4)}, str(d / "one_layer.safetensors"))
    save_file({"0.weight": torch.randn(8, 3), "2.weight": torch.randn(2, 5)}, str(d / "nochain.safetensors"))
    sd = mlp_state()
    sd["2.weight"][1, 1] = math.nan
    save_file(sd, str(d / "nan_w.safetensors"))
    sd = mlp_state()
    sd["0.bias"][0] = math.inf
    save_file(sd, str(d / "nan_b.safetensors"))
    save_file({k: (v * 10).to(torch.int32) for k, v in mlp_state().items()}, str(d / "int_w.safetensors"))
    (d / "clauses_idx.json").write_text(json.dumps([[0, 1], [2, 40]]))
    (d / "clauses_notjson.json").write_text("[[0, 1], [2")
    (d / "clauses_shape.json").write_text(json.dumps({"a": 1}))
    (d / "clauses_ok.json").write_text(json.dumps([[0, 1], [2, 3]]))
    for name, cfg in (("hf_mamba", {"model_type": "mamba"}), ("hf_noweights", {"model_type": "bert"})):
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(cfg))
    save_file({"x.weight": torch.zeros(2, 2)}, str(d / "hf_mamba" / "model.safetensors"))
    (d / "hf_noconfig").mkdir()
    save_file({"x.weight": torch.zeros(2, 2)}, str(d / "hf_noconfig" / "model.safetensors"))
    (d / "hf_badconfig").mkdir()
    (d / "hf_badconfig" / "config.json").write_text("{oops")
    tiny_bert(d / "bert")
    tiny_bert(d / "bert_notok", tokenizer=False)
    shutil.copytree(d / "bert", d / "hf_shard")
    (d / "hf_shard" / "model.safetensors").rename(d / "hf_shard" / "part-1.safetensors")
    index = {"metadata": {}, "weight_map": {"embeddings.word_embeddings.weight": "part-2.safetensors"}}
    (d / "hf_shard" / "model.safetensors.index.json").write_text(json.dumps(index))
    x = torch.randn(50, 16)
    (d / "data_rnd.pt").write_bytes(bytes((i * 31 + 5) % 253 for i in range(3000)))
    save_file({"x": x, "y": torch.randint(0, 6, (50,))}, str(d / "data.safetensors"))
    (d / "data_trunc.safetensors").write_bytes((d / "data.safetensors").read_bytes()[:300])
    torch.save({"x": x, "y": torch.randint(0, 6, (49,))}, d / "data_len.pt")
    torch.save({"x": x.view(50, 4, 4), "y": torch.randint(0, 6, (50,))}, d / "data_3d.pt")
    torch.save({"x": x}, d / "data_noy.pt")
    torch.save({"x": x, "y": torch.randint(0, 6, (50,)), "x_val": x}, d / "data_xval.pt")
    torch.save({"x": torch.randn(50, 20), "y": torch.randint(0, 6, (50,))}, d / "data_wide.pt")
    sentences(d / "text.txt")
    (d / "text_bin.txt").write_bytes(b"what is\x00\x01\x02" * 40)
    (d / "text_short.txt").write_text("one\ntwo\n")
    _recipe(d / "r_ten.yaml", epochs="ten")
    (d / "r_bin.yaml").write_bytes(b"\x00\x01\x02\xff\xfe" * 20)
    (d / "r_list.yaml").write_text("- 1\n- 2\n")
    _recipe(d / "r_alpha.yaml", conversions=[{"alpha": "two"}])
    _recipe(d / "r_hidden.yaml", model={"hidden": "8"})
    _recipe(d / "r_unknown.yaml", epochz=3)
    _recipe(d / "r_clause.yaml", data="digits", conversions=[{"split": "clause"}])
    _recipe(d / "r_ok.yaml")
    (d / "notes.txt").write_text("a user's own notes\n")
    (d / "ft.safetensors.log.json").write_text('{"mine": "a log of my own"}\n')
    (d / "user_dir").mkdir()
    (d / "user_dir" / "keep.txt").write_text("precious\n")
    (d / "corrupt.onnx").write_bytes(b"\x08\x07\x12\xff\xff\xff garbage")
    (d / "model.onnx.data").write_bytes(b"a user's file that happens to have this name")
    (d / "out").mkdir()
    return d


CASES = {
    # convert: the checkpoint
    "convert-missing": (["convert", "{ws}/nope.safetensors", "--out", "{ws}/out/o.safetensors"], "no such file"),
    "convert-empty": (["convert", "{ws}/empty.safetensors", "--out", "{ws}/out/o.safetensors"], "is empty"),
    "convert-truncated": (["convert", "{ws}/trunc.safetensors", "--out", "{ws}/out/o.safetensors"], "truncated"),
    "convert-corrupt": (["convert", "{ws}/corrupt.safetensors", "--out", "{ws}/out/o.safetensors"], "corrupt"),
    "convert-random-pt": (["convert", "{ws}/rnd.pt", "--out", "{ws}/out/o.safetensors"], "not a readable PyTorch"),
    "convert-truncated-pt": (["convert", "{ws}/trunc.pt", "--out", "{ws}/out/o.safetensors"], "truncated or corrupt"),
    "convert-pickled-object": (["convert", "{ws}/obj.pt", "--out", "{ws}/out/o.safetensors"], "refusing to unpickle"),
    "convert-non-tensor": (["convert", "{ws}/nontensor.pt", "--out", "{ws}/out/o.safetensors"], "state dict of"),
    "convert-one-layer": (["convert", "{ws}/one_layer.safetensors", "--out", "{ws}/out/o.safetensors"], "no expand"),
    "convert-no-chain": (["convert", "{ws}/nochain.safetensors", "--out", "{ws}/out/o.safetensors"], "don't chain"),
    "convert-nan-weight": (["convert", "{ws}/nan_w.safetensors", "--out", "{ws}/out/o.safetensors"], "NaN or Inf"),
    "convert-inf-bias": (["convert", "{ws}/nan_b.safetensors", "--out", "{ws}/out/o.safetensors"], "0.bias holds NaN"),
    "convert-int-weights": (["convert", "{ws}/int_w.safetensors", "--out", "{ws}/out/o.safetensors"], "I32 values"),
    "convert-hf-unsupported": (["convert", "{ws}/hf_mamba", "--out", "{ws}/out/m"], "model_type='mamba'"),
    "convert-hf-no-config": (["convert", "{ws}/hf_noconfig", "--out", "{ws}/out/m"], "without config.json"),
    "convert-hf-bad-config": (["convert", "{ws}/hf_badconfig", "--out", "{ws}/out/m"], "not valid JSON"),
    "convert-hf-no-weights": (["convert", "{ws}/hf_noweights", "--out", "{ws}/out/m"], "has no model.safetensors"),
    "convert-hf-missing-shard": (["convert", "{ws}/hf_shard", "--out", "{ws}/out/m"], "shard part-2.safetensors"),
    # convert: options
    "convert-alpha-0": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/out/o.safetensors", "--alpha", "0"],
        "at least 1",
    ),
    "convert-alpha-huge": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/out/o.safetensors", "--alpha", "1000000"],
        "exceeds the 12 inputs",
    ),
    "convert-alpha-text": (["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--alpha", "x"], "alpha"),
    "convert-clause-index": (
        [
            "convert",
            "{ws}/mlp.safetensors",
            "--out",
            "{ws}/o.safetensors",
            "--split",
            "clause",
            "--clauses",
            "{ws}/clauses_idx.json",
        ],
        "clause index 40",
    ),
    "convert-clause-no-file": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--split", "clause"],
        "needs --clauses",
    ),
    "convert-clauses-unused": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--clauses", "{ws}/clauses_ok.json"],
        "only used by --split clause",
    ),
    "convert-clauses-not-json": (
        [
            "convert",
            "{ws}/mlp.safetensors",
            "--out",
            "{ws}/o.safetensors",
            "--split",
            "clause",
            "--clauses",
            "{ws}/clauses_notjson.json",
        ],
        "not valid JSON",
    ),
    "convert-clauses-shape": (
        [
            "convert",
            "{ws}/mlp.safetensors",
            "--out",
            "{ws}/o.safetensors",
            "--split",
            "clause",
            "--clauses",
            "{ws}/clauses_shape.json",
        ],
        "lists of input indices",
    ),
    "convert-budget-fraction": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--budget", "1.5"],
        "--budget '1.5'",
    ),
    "convert-budget-zero": (["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--budget", "0"], "0"),
    "convert-budget-word": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--budget", "lots"],
        "--budget 'lots'",
    ),
    "convert-budget-one-is-ambiguous": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--budget", "1"],
        "write 1.0 or 100%",
    ),
    "convert-budget-percent-over": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--budget", "150%"],
        "must be in (0, 1]",
    ),
    "convert-budget-too-small": (
        ["convert", "{ws}/deep.safetensors", "--out", "{ws}/o.safetensors", "--budget", "3"],
        "choose a larger --budget",
    ),
    "convert-bad-regex": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--targets", "("],
        "invalid regular expression",
    ),
    "convert-targets-none": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--targets", "^zz$"],
        "matched no expandable layer",
    ),
    "convert-outgoing": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--outgoing", "x"],
        "--outgoing",
    ),
    "convert-overlap": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--overlap", "2"],
        "0 and 1",
    ),
    "convert-activation": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--activation", "swish"],
        "--activation",
    ),
    "convert-split": (["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--split", "x"], "--split"),
    "convert-out-pt": (["convert", "{ws}/mlp.safetensors", "--out", "{ws}/out/o.pt"], "*.safetensors"),
    "convert-out-under-a-file": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/clauses_ok.json/o.safetensors"],
        "cannot create folder",
    ),
    "convert-unknown-option": (["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--foo"], "--foo"),
    "convert-missing-out": (["convert", "{ws}/mlp.safetensors"], "--out"),
    # convert: outputs that would destroy something
    "convert-out-is-input": (["convert", "{ws}/mlp.safetensors", "--out", "{ws}/mlp.safetensors"], "is the input"),
    "convert-out-inside-input": (["convert", "{ws}/bert", "--out", "{ws}/bert/sub"], "lies inside the input"),
    "convert-out-contains-input": (["convert", "{ws}/bert", "--out", "{ws}"], "contains the input"),
    "convert-out-user-file": (["convert", "{ws}/mlp.safetensors", "--out", "{ws}/notes.txt"], "pass --force"),
    "convert-out-user-dir": (["convert", "{ws}/bert", "--out", "{ws}/user_dir"], "pass --force"),
    "convert-out-clauses": (
        [
            "convert",
            "{ws}/mlp.safetensors",
            "--out",
            "{ws}/clauses_ok.json",
            "--split",
            "clause",
            "--clauses",
            "{ws}/clauses_ok.json",
        ],
        "is the input",
    ),
    # convert: calibration
    "convert-calibration-empty": (
        ["convert", "{ws}/bert", "--out", "{ws}/out/m", "--calibration", "{ws}/empty.safetensors"],
        "at least 8 non-empty lines",
    ),
    "convert-calibration-binary": (
        ["convert", "{ws}/bert", "--out", "{ws}/out/m", "--calibration", "{ws}/text_bin.txt"],
        "not a text file",
    ),
    "convert-calibration-short": (
        ["convert", "{ws}/bert", "--out", "{ws}/out/m", "--calibration", "{ws}/text_short.txt"],
        "at least 8 non-empty lines",
    ),
    "convert-calibration-missing": (
        ["convert", "{ws}/bert", "--out", "{ws}/out/m", "--calibration", "{ws}/nope.txt"],
        "no such text file",
    ),
    "convert-calibration-width": (
        ["convert", "{ws}/dnf_mlp.safetensors", "--out", "{ws}/o.safetensors", "--calibration", "{ws}/data_wide.pt"],
        "has 20 features but the model's first layer reads 16",
    ),
    "convert-calibration-budget-all": (
        [
            "convert",
            "{ws}/mlp.safetensors",
            "--out",
            "{ws}/o.safetensors",
            "--budget",
            "all",
            "--calibration",
            "digits",
        ],
        "--budget all keeps every weight",
    ),
    "convert-importance-alone": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--importance", "magnitude"],
        "--importance needs --calibration FILE",
    ),
    "convert-activation-split-alone": (
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--split", "activation"],
        "needs --calibration FILE",
    ),
    "convert-expand-fraction": (
        ["convert", "{ws}/bert", "--out", "{ws}/out/m", "--calibration", "{ws}/text.txt", "--expand-fraction", "1.5"],
        "between 0 and 1",
    ),
    "convert-fraction-with-all": (
        [
            "convert",
            "{ws}/bert",
            "--out",
            "{ws}/out/m",
            "--calibration",
            "{ws}/text.txt",
            "--select",
            "all",
            "--expand-fraction",
            "0.2",
        ],
        "applies to --select wasserstein",
    ),
    "convert-importance-unknown": (
        ["convert", "{ws}/bert", "--out", "{ws}/out/m", "--calibration", "{ws}/text.txt", "--importance", "grad"],
        "--importance 'grad'",
    ),
    "convert-calibration-is-out": (
        ["convert", "{ws}/bert", "--out", "{ws}/text.txt", "--calibration", "{ws}/text.txt"],
        "is the input",
    ),
    # inspect
    "inspect-missing": (["inspect", "{ws}/nope.safetensors"], "no such file"),
    "inspect-random-pt": (["inspect", "{ws}/rnd.pt"], "not a readable PyTorch"),
    "inspect-corrupt": (["inspect", "{ws}/corrupt.safetensors"], "corrupt"),
    # finetune: options
    "finetune-weight-decay": (
        [
            "finetune",
            "{ws}/dnf_mlp.safetensors",
            "--data",
            "digits",
            "--out",
            "{ws}/o.safetensors",
            "--weight-decay",
            "-1",
        ],
        "--weight-decay -1.0",
    ),
    "finetune-epochs": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "digits", "--out", "{ws}/o.safetensors", "--epochs", "0"],
        "--epochs 0",
    ),
    "finetune-lr": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "digits", "--out", "{ws}/o.safetensors", "--lr", "0"],
        "--lr 0.0",
    ),
    "finetune-lr-nan": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "digits", "--out", "{ws}/o.safetensors", "--lr", "nan"],
        "--lr nan",
    ),
    "finetune-optimizer": (
        [
            "finetune",
            "{ws}/dnf_mlp.safetensors",
            "--data",
            "digits",
            "--out",
            "{ws}/o.safetensors",
            "--optimizer",
            "lion",
        ],
        "--optimizer 'lion'",
    ),
    "finetune-device": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "digits", "--out", "{ws}/o.safetensors", "--device", "tpu"],
        "--device 'tpu'",
    ),
    "finetune-threads": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "digits", "--out", "{ws}/o.safetensors", "--threads", "-1"],
        "--threads -1",
    ),
    "finetune-dropconnect": (
        [
            "finetune",
            "{ws}/dnf_mlp.safetensors",
            "--data",
            "digits",
            "--out",
            "{ws}/o.safetensors",
            "--dropconnect",
            "1.5",
        ],
        "--dropconnect 1.5",
    ),
    # finetune: data
    "finetune-data-spec": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "nonsense", "--out", "{ws}/o.safetensors"],
        "unknown data spec",
    ),
    "finetune-dnf-prefix": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "dnfoo", "--out", "{ws}/o.safetensors"],
        "unknown data spec",
    ),
    "finetune-dnf-key": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "dnf:bogus=1", "--out", "{ws}/o.safetensors"],
        "unknown dnf parameter",
    ),
    "finetune-data-random-pt": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "{ws}/data_rnd.pt", "--out", "{ws}/o.safetensors"],
        "not a readable PyTorch",
    ),
    "finetune-data-truncated": (
        [
            "finetune",
            "{ws}/dnf_mlp.safetensors",
            "--data",
            "{ws}/data_trunc.safetensors",
            "--out",
            "{ws}/o.safetensors",
        ],
        "truncated or corrupt",
    ),
    "finetune-data-lengths": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "{ws}/data_len.pt", "--out", "{ws}/o.safetensors"],
        "x has 50 samples",
    ),
    "finetune-data-3d": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "{ws}/data_3d.pt", "--out", "{ws}/o.safetensors"],
        "must be (samples, features)",
    ),
    "finetune-data-no-y": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "{ws}/data_noy.pt", "--out", "{ws}/o.safetensors"],
        "named x and y",
    ),
    "finetune-data-x-val-only": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "{ws}/data_xval.pt", "--out", "{ws}/o.safetensors"],
        "only one of x_val and y_val",
    ),
    "finetune-data-width": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "{ws}/data_wide.pt", "--out", "{ws}/o.safetensors"],
        "has 20 input features",
    ),
    # finetune: outputs and inputs
    "finetune-out-is-data": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "{ws}/data.safetensors", "--out", "{ws}/data.safetensors"],
        "is the input",
    ),
    "finetune-out-is-teacher": (
        [
            "finetune",
            "{ws}/bert",
            "--teacher",
            "{ws}/bert_notok",
            "--data",
            "{ws}/text.txt",
            "--out",
            "{ws}/bert_notok",
        ],
        "is the input",
    ),
    "finetune-out-is-text": (
        ["finetune", "{ws}/bert", "--teacher", "{ws}/bert", "--data", "{ws}/text.txt", "--out", "{ws}/text.txt"],
        "is the input",
    ),
    "finetune-sidecar-user-file": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "digits", "--out", "{ws}/ft.safetensors"],
        "ft.safetensors.log.json exists",
    ),
    "finetune-resume-no-state": (
        ["finetune", "{ws}/dnf_mlp.safetensors", "--data", "digits", "--out", "{ws}/o.safetensors", "--resume"],
        "no state file",
    ),
    "finetune-hf-no-teacher": (
        ["finetune", "{ws}/bert", "--data", "{ws}/text.txt", "--out", "{ws}/out/m"],
        "fine-tuned by distillation",
    ),
    "finetune-teacher-not-hf": (
        [
            "finetune",
            "{ws}/bert",
            "--teacher",
            "{ws}/mlp.safetensors",
            "--data",
            "{ws}/text.txt",
            "--out",
            "{ws}/out/m",
        ],
        "not a Hugging Face model directory",
    ),
    "finetune-text-binary": (
        ["finetune", "{ws}/bert", "--teacher", "{ws}/bert", "--data", "{ws}/text_bin.txt", "--out", "{ws}/out/m"],
        "not a text file",
    ),
    "finetune-text-short": (
        ["finetune", "{ws}/bert", "--teacher", "{ws}/bert", "--data", "{ws}/text_short.txt", "--out", "{ws}/out/m"],
        "at least 10 non-empty lines",
    ),
    "finetune-no-tokenizer": (
        [
            "finetune",
            "{ws}/bert_notok",
            "--teacher",
            "{ws}/bert_notok",
            "--data",
            "{ws}/text.txt",
            "--out",
            "{ws}/out/m",
        ],
        "pass --tokenizer DIR",
    ),
    "finetune-dropconnect-hf": (
        [
            "finetune",
            "{ws}/bert",
            "--teacher",
            "{ws}/bert",
            "--data",
            "{ws}/text.txt",
            "--out",
            "{ws}/out/m",
            "--dropconnect",
            "0.2",
        ],
        "--dropconnect is for MLP",
    ),
    "finetune-recipe-type": (
        [
            "finetune",
            "{ws}/dnf_mlp.safetensors",
            "--data",
            "digits",
            "--out",
            "{ws}/o.safetensors",
            "--recipe",
            "{ws}/r_ten.yaml",
        ],
        "'epochs'",
    ),
    # run
    "run-recipe-epochs-text": (["run", "{ws}/r_ten.yaml", "--out", "{ws}/out/r"], "valid integer (got 'ten')"),
    "run-recipe-binary": (["run", "{ws}/r_bin.yaml", "--out", "{ws}/out/r"], "not a text file"),
    "run-recipe-list": (["run", "{ws}/r_list.yaml", "--out", "{ws}/out/r"], "is a list"),
    "run-recipe-alpha-text": (["run", "{ws}/r_alpha.yaml", "--out", "{ws}/out/r"], "'conversions.0.alpha'"),
    "run-recipe-hidden-text": (["run", "{ws}/r_hidden.yaml", "--out", "{ws}/out/r"], "'model.hidden'"),
    "run-recipe-unknown-key": (["run", "{ws}/r_unknown.yaml", "--out", "{ws}/out/r"], "unknown key 'epochz'"),
    "run-recipe-clause-digits": (["run", "{ws}/r_clause.yaml", "--out", "{ws}/out/r"], "needs a dnf: task"),
    "run-recipe-missing": (["run", "{ws}/nope.yaml", "--out", "{ws}/out/r"], "no such recipe"),
    "run-out-user-dir": (["run", "{ws}/r_ok.yaml", "--out", "{ws}/user_dir"], "pass --force"),
    "run-out-is-recipe": (["run", "{ws}/r_ok.yaml", "--out", "{ws}/r_ok.yaml"], "is the input"),
    "run-seeds": (["run", "{ws}/r_ok.yaml", "--out", "{ws}/out/r", "--seeds", "a,b"], "--seeds"),
    # export
    "export-opset": (["export", "{ws}/mlp.safetensors", "--out", "{ws}/out/m.onnx", "--opset", "12"], "--opset 12"),
    "export-hf-opset": (["export", "{ws}/bert", "--out", "{ws}/out/m.onnx", "--opset", "17"], "opset 18 or newer"),
    "export-layout": (["export", "{ws}/mlp.safetensors", "--out", "{ws}/out/m.onnx", "--layout", "csr"], "--layout"),
    "export-dtype": (["export", "{ws}/mlp.safetensors", "--out", "{ws}/out/m.onnx", "--dtype", "int8"], "--dtype"),
    "export-suffix": (["export", "{ws}/mlp.safetensors", "--out", "{ws}/out/m.pb"], "*.onnx"),
    "export-user-data-file": (["export", "{ws}/mlp.safetensors", "--out", "{ws}/model.onnx"], "model.onnx.data"),
    "export-fast-not-fpe": (
        ["export", "{ws}/mlp.safetensors", "--out", "{ws}/out/m.onnx", "--layout", "fast"],
        "fpewiden metadata",
    ),
    "export-missing": (["export", "{ws}/nope.safetensors", "--out", "{ws}/out/m.onnx"], "no such file"),
    # bench
    "bench-threads": (["bench", "{ws}/mlp.safetensors", "--data", "digits", "--threads", "0"], "--threads"),
    "bench-corrupt-onnx": (["bench", "{ws}/corrupt.onnx", "--data", "digits"], "not a readable ONNX model"),
    "bench-json-under-a-file": (
        ["bench", "{ws}/mlp.safetensors", "--data", "digits", "--json", "{ws}/clauses_ok.json/b.json"],
        "cannot create folder",
    ),
    "bench-plot-is-model": (
        ["bench", "{ws}/mlp.safetensors", "--data", "digits", "--plot", "{ws}/mlp.safetensors"],
        "name a .png, .svg, .pdf or .jpg file",
    ),
    "bench-plot-unknown-format": (
        ["bench", "{ws}/mlp.safetensors", "--data", "digits", "--plot", "{ws}/p.tiff"],
        "name a .png, .svg, .pdf or .jpg file",
    ),
    "bench-plot-is-data": (
        ["bench", "{ws}/mlp.safetensors", "--data", "{ws}/data.safetensors", "--json", "{ws}/data.safetensors"],
        "is the input",
    ),
    "bench-json-is-data": (
        ["bench", "{ws}/dnf_mlp.safetensors", "--data", "{ws}/data.safetensors", "--json", "{ws}/data.safetensors"],
        "is the input",
    ),
    "bench-markdown-user-file": (
        ["bench", "{ws}/mlp.safetensors", "--data", "digits", "--markdown", "{ws}/notes.txt"],
        "pass --force",
    ),
    "bench-mlp-and-hf": (["bench", "{ws}/mlp.safetensors", "{ws}/bert", "--data", "digits"], "not both"),
    "bench-seq-len": (["bench", "{ws}/bert", "--data", "{ws}/text.txt", "--seq-len", "0"], "--seq-len"),
    "bench-hf-no-tokenizer": (["bench", "{ws}/bert_notok", "--data", "{ws}/text.txt"], "pass --tokenizer DIR"),
    "bench-batch-size": (["bench", "{ws}/mlp.safetensors", "--data", "digits", "--batch-sizes", "0"], "at least 1"),
    "bench-engine": (["bench", "{ws}/mlp.safetensors", "--data", "digits", "--engines", "tvm"], "unknown engine"),
    "bench-no-data": (["bench", "{ws}/mlp.safetensors"], "--data is required"),
    "bench-missing-model": (["bench", "{ws}/nope.safetensors", "--data", "digits"], "no such model"),
    "bench-sweep-out-user-dir": (
        ["bench", "--sweep", "{ws}/r_ok.yaml", "--sweep-out", "{ws}/user_dir"],
        "pass --force",
    ),
    "no-command-option": (["--bogus"], "No such option"),
}


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, lib, tmp_path):
    args, fragment = CASES[case]
    ws = tmp_path / "ws"
    shutil.copytree(lib, ws)
    before = snapshot(ws)
    res = runner.invoke(app, [a.format(ws=ws) for a in args])
    assert res.exit_code == 2, (res.exit_code, res.output)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert snapshot(ws) == before  # inputs and bystanders unchanged, nothing new (no temp files either)


def test_suite_is_large_enough():
    assert len(CASES) >= 60


@pytest.mark.parametrize(
    "args",
    [
        ["convert", "{ws}/rnd.pt", "--out", "{ws}/o.safetensors"],
        ["inspect", "{ws}/rnd.pt"],
        ["convert", "{ws}/mlp.safetensors", "--out", "{ws}/o.safetensors", "--nope"],
    ],
)
def test_real_stderr_is_one_line(args, lib, tmp_path):
    """In a real process: no library warning leaks before the error line, and usage errors are one line too."""
    ws = tmp_path / "ws"
    shutil.copytree(lib, ws)
    res = subprocess.run(
        [sys.executable, "-m", "fpewiden", *[a.format(ws=ws) for a in args]],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        cwd=ROOT,
    )
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("error: "), res.stderr
