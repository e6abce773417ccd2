"""finetune: masks preserved bit for bit, formats kept, resume equality after a real kill, every bad input."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.errors import FpewidenError
from fpewiden.io.checkpoint import open_checkpoint
from fpewiden.model.chain_mlp import ChainMLP
from fpewiden.train.config import TrainConfig
from fpewiden.train.trainer import CRASH_ENV, train
from tests.helpers import mlp_state

runner = CliRunner()
DNF = "dnf:inputs=16,clauses=6,literals=3,n=1200"
ROOT = Path(__file__).resolve().parents[1]


def dnf_mlp(path: Path, hidden=8, density=1.0, suffix=".safetensors") -> Path:
    sd = mlp_state(widths=(16, hidden, 6), density=density)
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_converted_model_keeps_its_zero_pattern(tmp_path):
    src = dnf_mlp(tmp_path / "dense.safetensors")
    conv = tmp_path / "fpe.safetensors"
    convert(src, conv, ConvertOptions(alpha=2, budget=Budget.parse("0.7")))
    out = tmp_path / "ft.safetensors"
    res = cli("finetune", conv, "--data", DNF, "--out", out, "--epochs", "3", "--lr", "0.01")
    assert res.exit_code == 0, res.output
    a, b = open_checkpoint(conv), open_checkpoint(out)
    for name in ("0.weight", "2.weight"):
        ma, mb = a.mask(name), b.mask(name)
        assert torch.equal(ma, mb)  # stored masks identical
        wa, wb = a.get(name), b.get(name)
        assert torch.equal(wb != 0, mb)  # exactly the masked positions are non-zero
        assert not torch.equal(wa, wb)  # and it trained
    meta = safe_open(str(out), "pt").metadata()
    assert meta["fpewiden.alpha"] == "2" and meta["fpewiden.train_epochs"] == "3"
    assert json.loads(meta["fpewiden.train_final"]) == log_final(tmp_path / "ft.safetensors.log.json")
    log = json.loads((tmp_path / "ft.safetensors.log.json").read_text())
    assert [h["epoch"] for h in log["history"]] == [0, 1, 2, 3]  # held-out metrics before training, then per epoch
    assert log["before"] == log["history"][0] and "train_loss" not in log["before"]
    assert len(json.loads((tmp_path / "ft.safetensors.clauses.json").read_text())["clauses"]) == 6
    assert not (tmp_path / "ft.safetensors.state.pt").exists()


def log_final(path: Path) -> dict:
    return json.loads(path.read_text())["final"]


def test_pruned_input_without_masks_keeps_zeros(tmp_path):
    src = dnf_mlp(tmp_path / "pruned.safetensors", density=0.5)
    out = tmp_path / "ft.safetensors"
    assert cli("finetune", src, "--data", DNF, "--out", out, "--epochs", "2").exit_code == 0
    before, after = load_file(src), load_file(out)
    for n in ("0.weight", "2.weight"):
        assert torch.equal(before[n] != 0, after[n] != 0)


def test_dense_trains_densely_and_pt_stays_pt(tmp_path):
    src = dnf_mlp(tmp_path / "dense.pt", suffix=".pt")
    out = tmp_path / "ft.pt"
    assert cli("finetune", src, "--data", DNF, "--out", out, "--epochs", "2").exit_code == 0
    sd = torch.load(out, weights_only=True)
    assert set(k for k in sd if not k.startswith("fpewiden")) == set(mlp_state(widths=(16, 8, 6)))
    assert all(bool((sd[n] != 0).all()) for n in ("0.weight", "2.weight"))
    assert sd["fpewiden_metadata"]["fpewiden.train_epochs"] == "2"


def test_digits_and_tensor_files(tmp_path):
    save_file(ChainMLP.fresh([64, 16, 10]).tensors(), str(tmp_path / "m.safetensors"))
    res = cli(
        "finetune",
        tmp_path / "m.safetensors",
        "--data",
        "digits",
        "--out",
        tmp_path / "d.safetensors",
        "--epochs",
        "3",
        "--lr",
        "0.01",
    )
    assert res.exit_code == 0, res.output
    log = json.loads((tmp_path / "d.safetensors.log.json").read_text())
    assert log["final"]["accuracy"] > 0.5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 64, generator=g)
    torch.save({"x": x, "y": (x[:, :10] > 0).float()}, tmp_path / "ml.pt")
    res = cli(
        "finetune",
        tmp_path / "m.safetensors",
        "--data",
        tmp_path / "ml.pt",
        "--out",
        tmp_path / "e.safetensors",
        "--epochs",
        "1",
    )
    assert res.exit_code == 0, res.output
    assert "multilabel" in json.loads((tmp_path / "e.safetensors.log.json").read_text())["data"]


@pytest.mark.parametrize(
    "data,fragment",
    [
        ("dnf:inputs=20,clauses=6", "has 20 input features but the model's first layer reads 16"),
        ("dnf:inputs=16,clauses=7", "7 multilabel targets per sample but the model has 6 outputs"),
        ("nonsense", "unknown data spec"),
        ("dnf:inputs=16,bogus=1", "unknown dnf parameter 'bogus'"),
    ],
)
def test_bad_data(tmp_path, data, fragment):
    src = dnf_mlp(tmp_path / "m.safetensors")
    res = cli("finetune", src, "--data", data, "--out", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and fragment in res.stderr and "Traceback" not in res.output, res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_labels_beyond_outputs_empty_and_single_class(tmp_path):
    src = dnf_mlp(tmp_path / "m.safetensors")
    x = torch.randn(50, 16)
    cases = {
        "big.pt": ({"x": x, "y": torch.randint(0, 9, (50,))}, "class labels up to 8 but the model has 6 outputs"),
        "one.pt": ({"x": x, "y": torch.zeros(50, dtype=torch.int64)}, "single class"),
        "empty.pt": ({"x": torch.zeros(0, 16), "y": torch.zeros(0, dtype=torch.int64)}, "no training or held-out"),
        "nan.pt": (
            {"x": torch.full((50, 16), math.nan), "y": torch.randint(0, 6, (50,))},
            "loss became nan at epoch 1",
        ),
    }
    for name, (tensors, fragment) in cases.items():
        torch.save(tensors, tmp_path / name)
        res = cli("finetune", src, "--data", tmp_path / name, "--out", tmp_path / "o.safetensors")
        assert res.exit_code == 2 and fragment in res.stderr, (name, res.output)
        assert not (tmp_path / "o.safetensors").exists()


class NaNAtEpoch2:
    """A task whose loss turns NaN in the second epoch."""

    n_train = 32

    def __init__(self):
        self.calls = 0
        self.x = torch.randn(32, 4)

    def loss(self, model, idx, device):
        self.calls += 1
        out = model(self.x[idx]).pow(2).mean()
        return out * math.nan if self.calls > 4 else out

    def evaluate(self, model, device):
        return {"loss": 0.0}


def test_nan_keeps_last_good_state(tmp_path):
    model = torch.nn.Linear(4, 2)
    state = tmp_path / "s.pt"
    with pytest.raises(FpewidenError, match=r"loss became nan at epoch 2, step 1; stopped .*holds epoch 1"):
        train(model, NaNAtEpoch2(), TrainConfig(epochs=3, batch_size=8, device="cpu"), state_path=state)
    assert torch.load(state, weights_only=True)["epoch"] == 1


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    src = dnf_mlp(tmp_path / "m.safetensors", hidden=64)
    conv = tmp_path / "fpe.safetensors"
    convert(src, conv, ConvertOptions(alpha=2))
    data = "dnf:inputs=16,clauses=6,literals=3,n=3000"
    args = ["finetune", str(conv), "--data", data, "--epochs", "4", "--batch-size", "32", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full.safetensors"
    subprocess.run(
        [sys.executable, "-m", "fpewiden", *args, "--out", str(full)], check=True, env=env, capture_output=True
    )
    part = tmp_path / "part.safetensors"
    state = tmp_path / "part.safetensors.state.pt"
    # the run kills itself (SIGKILL, no cleanup) right after writing epoch 2's state: the trainer's test hook
    res = subprocess.run([sys.executable, "-m", "fpewiden", *args, "--out", str(part)],
                         env={**env, CRASH_ENV: "2"}, capture_output=True)  # fmt: skip
    assert res.returncode == -signal.SIGKILL
    assert state.exists() and not part.exists(), "the run must be killed after its second epoch's state"
    assert torch.load(state, weights_only=True)["epoch"] == 2
    res = subprocess.run(
        [sys.executable, "-m", "fpewiden", *args, "--out", str(part), "--resume"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    a, b = load_file(full), load_file(part)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the killed run's half-written stage (its writer is gone) was removed by the resumed run
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
