"""DropConnect baseline: the gradient is the chain rule through W·M/(1-p), weights and zero patterns survive,
resume draws the same masks, recipes and the CLI take it, bad values fail in one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.data.specs import load_data
from fpewiden.errors import FpewidenError
from fpewiden.model.chain_mlp import ChainMLP
from fpewiden.recipes import Conversion, recipe_from_dict
from fpewiden.run import run_recipe
from fpewiden.train.config import TrainConfig
from fpewiden.train.dropconnect import DropConnect
from fpewiden.train.supervised import SupervisedTask
from fpewiden.train.trainer import epoch_seed, train
from tests.helpers import mlp_state

runner = CliRunner()
DNF = "dnf:inputs=16,clauses=6,literals=3,n=1200"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_gradient_is_the_chain_rule_and_weights_come_back(p):
    model = ChainMLP.fresh([12, 9, 5], "relu", seed=1)
    x, y = torch.randn(32, 12), torch.randn(32, 5)
    before = [w.detach().clone() for w in model.weights]
    dc = DropConnect(list(model.weights), p)
    dc.start_epoch(epoch_seed(7, 3))
    dc.drop()
    scales = [s.clone() for _, s in dc._saved]
    torch.nn.functional.mse_loss(model(x), y).backward()
    dc.restore()
    for w, b in zip(model.weights, before):
        assert torch.equal(w.detach(), b)  # restored bit for bit
    # reference: autograd through W * M / (1 - p) on a copy
    ref = ChainMLP.fresh([12, 9, 5], "relu", seed=1)
    leaves = [w.detach().clone().requires_grad_(True) for w in ref.weights]
    params = {f"layers.{i}.weight": w * s for i, (w, s) in enumerate(zip(leaves, scales))}
    out = torch.func.functional_call(ref, params, (x,))
    torch.nn.functional.mse_loss(out, y).backward()
    for w, leaf in zip(model.weights, leaves):
        torch.testing.assert_close(w.grad, leaf.grad)
    kept = torch.cat([(s != 0).flatten().float() for s in scales]).mean()
    assert abs(float(kept) - (1 - p)) < 0.12  # about 1 - p of the weights kept
    assert all(bool(torch.isin(s, torch.tensor([0.0, 1 / (1 - p)])).all()) for s in scales)


def test_masks_depend_on_seed_and_epoch_only():
    w = torch.nn.Parameter(torch.ones(40, 40))

    def mask(seed, epoch):
        dc = DropConnect([w], 0.5)
        dc.start_epoch(epoch_seed(seed, epoch))
        dc.drop()
        m = dc._saved[0][1].clone()
        dc.restore()
        return m

    assert torch.equal(mask(0, 1), mask(0, 1))
    assert not torch.equal(mask(0, 1), mask(0, 2)) and not torch.equal(mask(0, 1), mask(1, 1))
    assert torch.equal(w.detach(), torch.ones(40, 40))


def _task(seed=0):
    d = load_data(DNF, seed)
    return SupervisedTask(d.x, d.y, d.x_val, d.y_val, d.kind)


def test_resume_draws_the_same_masks(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.01, batch_size=64, device="cpu", dropconnect=0.3, seed=4)
    full = ChainMLP.fresh([16, 8, 6], seed=2)
    train(full, _task(), cfg, dropconnect_params=list(full.weights))
    part = ChainMLP.fresh([16, 8, 6], seed=2)
    state = tmp_path / "s.pt"
    first = TrainConfig(**{**cfg.model_dump(), "epochs": 2})
    train(part, _task(), first, state_path=state, dropconnect_params=list(part.weights))
    resumed = ChainMLP.fresh([16, 8, 6], seed=2)
    train(resumed, _task(), cfg, state_path=state, resume=True, dropconnect_params=list(resumed.weights))
    for a, b in zip(full.tensors().values(), resumed.tensors().values()):
        assert torch.equal(a, b)
    plain = ChainMLP.fresh([16, 8, 6], seed=2)
    train(
        plain, _task(), TrainConfig(**{**cfg.model_dump(), "dropconnect": 0.0}), dropconnect_params=list(plain.weights)
    )
    assert not torch.equal(plain.weights[0], full.weights[0])  # it really dropped something


def test_finetune_cli_keeps_zero_pattern_and_nnz(tmp_path):
    src = tmp_path / "dense.safetensors"
    save_file(mlp_state(widths=(16, 8, 6)), str(src))
    conv = tmp_path / "fpe.safetensors"
    convert(src, conv, ConvertOptions(alpha=2, budget=Budget.parse("same")))
    out = tmp_path / "dc.safetensors"
    res = runner.invoke(
        app, ["finetune", str(conv), "--data", DNF, "--out", str(out), "--epochs", "2", "--dropconnect", "0.5"]
    )
    assert res.exit_code == 0, res.output
    a, b = load_file(conv), load_file(out)
    for n in ("0.weight", "2.weight"):
        assert torch.equal(a[n] != 0, b[n] != 0) and not torch.equal(a[n], b[n])
    log = json.loads((tmp_path / "dc.safetensors.log.json").read_text())
    assert log["config"]["dropconnect"] == 0.5


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_bad_probability_is_one_line(tmp_path, value):
    src = tmp_path / "dense.safetensors"
    save_file(mlp_state(widths=(16, 8, 6)), str(src))
    res = runner.invoke(
        app, ["finetune", str(src), "--data", DNF, "--out", str(tmp_path / "o.safetensors"), "--dropconnect", value]
    )
    assert res.exit_code == 2
    assert "--dropconnect" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.safetensors").exists()


def test_recipe_dropconnect_arm_is_dense_at_equal_nonzeros(tmp_path):
    recipe = recipe_from_dict(
        {
            "name": "t",
            "data": DNF,
            "model": {"hidden": [8]},
            "epochs": 3,
            "warmup_epochs": 1,
            "seeds": [0],
            "conversions": [
                {"alpha": 2},
                {"alpha": 1, "dropconnect": 0.25},
                {"alpha": 2, "overlap": 1.0, "budget": "all", "dropconnect": 0.5, "prune_epochs": 1},
            ],
            "bench_repeat": 0,
        }
    )
    assert Conversion(alpha=1, dropconnect=0.25).label == "dense + DropConnect 0.25"
    wide = "wide dense ×2 + DropConnect 0.5, magnitude-pruned to the dense count (1 epochs)"
    res = run_recipe(recipe, tmp_path)
    by = {s["model"]: s for s in res["summary"]}
    assert set(by) == {"dense", "FPE α=2 random", "dense + DropConnect 0.25", wide}
    assert by["dense + DropConnect 0.25"]["nnz"] == by["dense"]["nnz"] == by["FPE α=2 random"]["nnz"]
    assert by["dense + DropConnect 0.25"]["neurons"] == by["dense"]["neurons"]
    # the wide baseline trains at twice the non-zeros, then is deployed at the dense count with twice the neurons
    assert by[wide]["nnz"] == by["dense"]["nnz"] and by[wide]["neurons"] == 2 * by["dense"]["neurons"]
    logs = sorted(tmp_path.glob("seed0/*dc0p5*_ft.safetensors.log.json"))
    assert len(logs) == 1 and json.loads(logs[0].read_text())["config"]["epochs"] == 1  # the last epoch, pruned
    pre = json.loads(next(tmp_path.glob("seed0/*dc0p5*_pre.safetensors.log.json")).read_text())
    assert pre["config"]["epochs"] == 1 and pre["config"]["dropconnect"] == 0.5
    assert pre["nnz"] == 2 * by["dense"]["nnz"]


def test_prune_epochs_must_fit():
    raw = {"data": DNF, "epochs": 3, "warmup_epochs": 1, "conversions": [{"alpha": 2, "prune_epochs": 2}]}
    with pytest.raises(FpewidenError, match=r"prune_epochs must be less than epochs - warmup_epochs \(2\)"):
        recipe_from_dict(raw)


def test_budget_all_expands_without_pruning(tmp_path):
    src = tmp_path / "dense.safetensors"
    sd = mlp_state(widths=(16, 8, 6))
    save_file(sd, str(src))
    w_in, w_out = sd["0.weight"], sd["2.weight"]
    out = tmp_path / "all.safetensors"
    rep = convert(src, out, ConvertOptions(alpha=2, budget=Budget.parse("all")))
    assert rep["nnz_after"] == w_in.numel() + 2 * w_out.numel()  # incoming split, outgoing copied, nothing pruned
    copies = tmp_path / "copies.safetensors"
    rep = convert(src, copies, ConvertOptions(alpha=2, budget=Budget.parse("all"), overlap=1.0))
    assert rep["nnz_after"] == 2 * (w_in.numel() + w_out.numel())
    t = load_file(copies)
    assert torch.equal(t["0.weight"][0::2], w_in) and torch.equal(t["0.weight"][1::2], w_in)
    assert torch.equal(t["2.weight"][:, 0::2], w_out) and torch.equal(t["2.weight"][:, 1::2], w_out)
    assert str(Budget.parse("all")) == "all"
