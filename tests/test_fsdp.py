"""Distributed fine-tuning on two gloo processes (CPU): DDP, and `--fsdp` against it on the same global batch;
resume after a kill; bad states."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import ConvertOptions, convert
from fpewiden.io.checkpoint import open_checkpoint
from fpewiden.train.trainer import CRASH_ENV
from tests.helpers import sentences, tiny_bert, tiny_causal
from tests.test_finetune import DNF, dnf_mlp

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fpewiden"]


def torchrun(*args: str) -> None:
    res = subprocess.run([*TORCHRUN, *args], capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-6000:]


def assert_same_training(a_path: Path, b_path: Path, names: list[str], rtol: float = 1e-5) -> None:
    a, b = open_checkpoint(a_path), open_checkpoint(b_path)
    for n in names:
        assert torch.equal(a.mask(n), b.mask(n)), n
        assert torch.equal(b.get(n) != 0, b.mask(n)), n  # the zero pattern is the mask, bit for bit
    assert a.shapes.keys() == b.shapes.keys()
    for k in a.shapes:
        t, u = a.get(k), b.get(k)
        assert float((t.float() - u.float()).norm()) <= rtol * float(t.float().norm()) + 1e-12, k


@pytest.fixture(scope="module")
def mlp_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    conv = tmp / "fpe.safetensors"
    convert(dnf_mlp(tmp / "m.safetensors"), conv, ConvertOptions(alpha=2))
    common = [str(conv), "--data", DNF, "--epochs", "3", "--lr", "0.01", "--device", "cpu"]
    torchrun("finetune", *common, "--out", str(tmp / "ddp.safetensors"))
    torchrun("finetune", *common, "--fsdp", "--out", str(tmp / "fsdp.safetensors"))
    return tmp, conv, common


def test_fsdp_trains_like_ddp_with_the_same_masks(mlp_runs):
    tmp, conv, _ = mlp_runs
    assert_same_training(tmp / "ddp.safetensors", tmp / "fsdp.safetensors", ["0.weight", "2.weight"])
    before = open_checkpoint(conv)
    after = open_checkpoint(tmp / "fsdp.safetensors")
    assert torch.equal(before.mask("0.weight"), after.mask("0.weight"))
    assert not torch.equal(before.get("0.weight"), after.get("0.weight"))  # it did train
    assert not (tmp / "fsdp.safetensors.state").exists()  # the resume state goes once the model is written
    losses = [h["loss"] for h in json.loads((tmp / "fsdp.safetensors.log.json").read_text())["history"]]
    assert losses[-1] < losses[0]


def test_fsdp_resume_after_a_kill_is_exact(mlp_runs):
    tmp, _, common = mlp_runs
    part = tmp / "part.safetensors"
    state = tmp / "part.safetensors.state"
    args = [*TORCHRUN, "finetune", *common, "--fsdp", "--out", str(part)]
    # every rank kills itself (SIGKILL) once all have written epoch 1's state: the trainer's test hook
    res = subprocess.run(args, env={**ENV, CRASH_ENV: "1"}, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0
    assert state.is_dir() and not part.exists(), "the run must be killed after its first epoch's state"
    assert json.loads((state / "fpewiden-state.json").read_text())["epoch"] == 1
    torchrun("finetune", *common, "--fsdp", "--out", str(part), "--resume")
    a, b = load_file(tmp / "fsdp.safetensors"), load_file(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # loaded in one process, on purpose
def test_a_resume_state_whose_metadata_would_run_code_is_refused(tmp_path):
    """DCP's metadata file is a pickle: fpewiden reads it with an unpickler that admits only DCP's own classes."""
    from fpewiden.errors import FpewidenError
    from fpewiden.train import fsdp

    state = tmp_path / "o.safetensors.state"
    state.mkdir()
    (state / ".metadata").write_bytes(b"\x80\x04cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR.")
    (state / "fpewiden-state.json").write_text('{"epoch": 1, "history": []}')
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(FpewidenError, match=r"does not belong to this model .*os\.system is not part of"):
        fsdp.load_state(state, model, opt)
    assert not (tmp_path / "pwned").exists()


def test_fsdp_needs_torchrun_and_refuses_what_it_cannot_shard(tmp_path):
    from fpewiden.errors import FpewidenError
    from fpewiden.train.config import TrainConfig
    from fpewiden.train.trainer import Distributed, check_fsdp

    src = dnf_mlp(tmp_path / "m.safetensors")
    args = ["finetune", str(src), "--data", DNF, "--epochs", "1", "--device", "cpu", "--fsdp"]
    res = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 2 and "launch with torchrun" in res.output
    assert not (tmp_path / "o.safetensors").exists()
    two = Distributed(rank=0, world=2)
    with pytest.raises(FpewidenError, match="tied outgoing weights"):
        check_fsdp(TrainConfig(fsdp=True), two, tied=True)
    with pytest.raises(FpewidenError, match="--dropconnect"):
        check_fsdp(TrainConfig(fsdp=True, dropconnect=0.1), two, tied=False)
    check_fsdp(TrainConfig(fsdp=True), two, tied=False)  # what it can shard passes


def test_fsdp_distils_a_causal_lm_like_ddp(tmp_path):
    src = tiny_causal(tmp_path / "llama")
    conv = tmp_path / "fpe"
    convert(src, conv, ConvertOptions(alpha=2))
    text = sentences(tmp_path / "text.txt", n=24)
    common = ["finetune", str(conv), "--teacher", str(src), "--data", str(text), "--epochs", "1", "--device", "cpu",
              "--batch-size", "4"]  # fmt: skip
    torchrun(*common, "--out", str(tmp_path / "ddp"))
    torchrun(*common, "--fsdp", "--out", str(tmp_path / "fsdp"))
    ck = open_checkpoint(conv)
    masked = [n for n in ck.shapes if ck.mask(n) is not None]
    assert len(masked) == 6  # gate, up, down of both blocks
    assert_same_training(tmp_path / "ddp", tmp_path / "fsdp", masked)


def test_an_mlp_chain_is_sharded_layer_by_layer():
    """Each Linear is its own FSDP unit, so a rank gathers one layer at a time, not the whole chain."""
    from fpewiden.model.chain_mlp import ChainLayer, ChainMLP
    from fpewiden.train.fsdp import units

    model = ChainMLP.fresh([6, 8, 8, 3])
    found = units(model)
    assert [type(u) for u in found] == [ChainLayer] * 3
    assert {id(p) for u in found for p in u.parameters()} == {id(p) for p in model.parameters()}


SHARDED_LOAD = r"""
import sys, torch, torch.distributed as dist
from pathlib import Path
from fpewiden.io.checkpoint import Checkpoint
from fpewiden.model.loaded import load_model, load_skeleton
from fpewiden.train.fsdp import load_shards

dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
ref = load_model(Path(sys.argv[1]))
tr, masked = load_skeleton(Path(sys.argv[1]))
assert all(p.device.type == "meta" for p in tr.model.parameters())
def whole(self, name):
    raise AssertionError(f"read whole: {name}")
Checkpoint.get = whole  # a rank reads its rows only
name_of = {id(p): n for n, p in tr.model.named_parameters()}
module_name = {ck_name: name_of[id(p)] for ck_name, p in tr.param_of.items()}
masks = load_shards(tr.model, tr.param_of, tr.ck, masked, torch.device("cpu"))
got = {n: p.full_tensor() for n, p in tr.model.named_parameters()}
for n, p in ref.model.named_parameters():
    assert torch.equal(got[n], p.detach()), n
by_name = dict(tr.model.named_parameters())
assert ref.masks
for ck_name, m in ref.masks.items():
    assert torch.equal(masks[by_name[module_name[ck_name]]].full_tensor(), m), ck_name
for n, b in ref.model.named_buffers():
    assert torch.equal(tr.model.get_buffer(n), b), n
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_fsdp_fills_each_shard_from_the_checkpoint(tmp_path, kind):
    """Under --fsdp the model is built on meta and each rank reads only its rows of every tensor: the shards hold
    exactly what load_model loads, masks (stored or from zeros) and the skeleton's buffers included."""
    if kind == "mlp":
        src = tmp_path / "fpe.safetensors"
        convert(dnf_mlp(tmp_path / "m.safetensors"), src, ConvertOptions(alpha=2))
    else:
        src = tmp_path / "fpe"
        convert(tiny_causal(tmp_path / "m", "llama"), src, ConvertOptions(alpha=2))
    res = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(src), str(tmp_path / "store")], capture_output=True,
                         text=True, env=ENV, timeout=120, cwd=ROOT)  # fmt: skip
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


@given(st.integers(0, 7), st.integers(0, 9), st.sampled_from(["float32", "bfloat16"]))
def test_checkpoint_rows_are_the_rows_of_the_tensor(start, length, dtype):
    import tempfile

    from safetensors.torch import save_file

    t = torch.arange(6 * 5, dtype=torch.float32).reshape(6, 5).to(getattr(torch, dtype))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.safetensors"
        save_file({"0.weight": t, "0.bias": torch.ones(6)}, str(path))
        ck = open_checkpoint(path)
        got = ck.rows("0.weight", start, start + length)
        assert torch.equal(got, t[start : start + length]) and got.dtype == t.dtype
        assert torch.equal(ck.rows("0.bias", start, start + length), torch.ones(6)[start : start + length])


def test_a_checkpoint_missing_a_parameter_is_loaded_whole_under_fsdp(tmp_path):
    """transformers initialises a parameter the checkpoint lacks; the sharded loader cannot, so it declines and
    finetune shards after a whole load instead."""
    from safetensors.torch import save_file

    from fpewiden.model.loaded import load_skeleton

    src = tiny_causal(tmp_path / "m", "llama")
    assert load_skeleton(src) is not None
    (weights,) = src.glob("*.safetensors")
    tensors = load_file(weights)
    del tensors[next(k for k in tensors if k.endswith("norm.weight") and "layers" not in k)]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    assert load_skeleton(src) is None


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_ddp_distils_models_whose_parameters_the_loss_may_not_reach(tmp_path, family):
    """Under DDP on 2 processes: BERT's pooler gets no gradient from the pooled-hidden-state loss (DDP waited for
    one of every trainable parameter and failed, "Expected to have finished reduction…"; the trainer freezes what
    the loss never reaches before wrapping, so the pooler stays the student's own); GPT-2 (Conv1D weights, a tied
    LM head). The run ends, the masks hold, the widened matrices trained."""
    src = tiny_bert(tmp_path / family) if family == "bert" else tiny_causal(tmp_path / family, family)
    conv = tmp_path / "fpe"
    convert(src, conv, ConvertOptions(alpha=2))
    text = sentences(tmp_path / "text.txt", n=24)
    torchrun("finetune", str(conv), "--teacher", str(src), "--data", str(text), "--epochs", "1", "--device", "cpu",
             "--batch-size", "4", "--out", str(tmp_path / "ddp"))  # fmt: skip
    before, after = open_checkpoint(conv), open_checkpoint(tmp_path / "ddp")
    pooler = [n for n in before.shapes if "pooler" in n]
    assert (family == "bert") == bool(pooler) and all(torch.equal(before.get(n), after.get(n)) for n in pooler)
    masked = [n for n in before.shapes if before.mask(n) is not None]
    assert masked and all(torch.equal(after.get(n) != 0, before.mask(n)) for n in masked)
    assert any(not torch.equal(before.get(n), after.get(n)) for n in masked)  # it did train
