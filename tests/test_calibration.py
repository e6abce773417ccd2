"""Calibrated conversion: the math (saliency, selection, expansion, refits) and the command end to end."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import Budget, Calibration, ConvertOptions, convert
from fpewiden.fpe import reference
from fpewiden.fpe.calibrated import CalibratedOptions, calibrate_pair
from fpewiden.fpe.expand import Pair, keep_largest
from fpewiden.fpe.pair_function import PairFunction, pair_output
from fpewiden.fpe.ridge import refit as calibrated_refit
from fpewiden.fpe.selection import expand_selected, normal_quantiles, saliency, select_neurons, wasserstein_to_gaussian
from fpewiden.fpe.solvers import refit_rows
from fpewiden.io.checkpoint import open_checkpoint
from fpewiden.model.chain_mlp import ChainMLP
from tests.helpers import sentences, tiny_bert, tiny_causal, write_mlp

runner = CliRunner()


def pair_and_inputs(h=6, d=10, o=4, tokens=200, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w_in = torch.randn(h, d, generator=g)
    w_out = torch.randn(o, h, generator=g)
    b = torch.randn(h, generator=g) if bias else None
    pair = Pair([w_in], [torch.ones(h, d, dtype=torch.bool)], [b], w_out, torch.ones(o, h, dtype=torch.bool))
    return pair, torch.randn(tokens, d, generator=g)


def test_wasserstein_is_zero_for_gaussian_quantiles_and_large_for_sparse_activity():
    q = normal_quantiles(1000)
    sparse = torch.relu(torch.randn(1000, generator=torch.Generator().manual_seed(0)) - 1.5)
    w = wasserstein_to_gaussian(torch.stack([q * 3 + 2, sparse], dim=1))
    assert w[0] < 2e-3 and w[1] > 0.3  # quantiles sit on the Gaussian (up to the sample std), sparse is far off


def test_select_neurons_takes_the_highest_scores():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2])
    assert select_neurons(scores, 0.4).tolist() == [False, True, False, True, False]
    assert not select_neurons(scores, 0.0).any() and select_neurons(scores, 1.0).all()


def test_expand_selected_splits_only_the_chosen_neurons():
    pair, _ = pair_and_inputs()
    counts = torch.tensor([2, 1, 3, 1, 1, 2])
    a = torch.randint(0, 3, (6, 10), generator=torch.Generator().manual_seed(1)) % counts[:, None]
    ex, parent = expand_selected(pair, counts, a)
    assert parent.tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 5, 5]
    for i in range(6):
        rows = parent == i
        assert torch.equal(ex.m_in[0][rows].sum(0), torch.ones(10, dtype=torch.long))  # a partition of the inputs
        assert torch.allclose(ex.w_in[0][rows].sum(0), pair.w_in[0][i])
        assert torch.allclose(ex.b_in[0][rows].sum(), pair.b_in[0][i])
        assert torch.equal(ex.w_out[:, rows], pair.w_out[:, i : i + 1].expand(-1, int(rows.sum())))
    assert torch.equal(ex.w_in[0][parent == 1], pair.w_in[0][1:2])  # one child: the neuron as it was


def test_saliency_is_the_exact_output_change_for_a_linear_pair():
    pair, x = pair_and_inputs()
    fn = PairFunction(lambda t: t)
    scores = saliency(pair, x, fn)
    base = pair_output(pair, x, fn, None)
    for k, (i, j) in enumerate([(0, 3), (5, 9)]):  # an incoming and an outgoing weight, each removed
        w_in, w_out = pair.w_in[0].clone(), pair.w_out.clone()
        if k == 0:
            w_in[i, j] = 0
            got = scores[0][i, j]
        else:
            w_out[i % 4, j % 6] = 0
            got = scores[1][i % 4, j % 6]
        changed = pair_output(Pair([w_in], pair.m_in, pair.b_in, w_out, pair.m_out), x, fn, None)
        torch.testing.assert_close(got, (changed - base).norm(), rtol=1e-4, atol=1e-4)


def masked_problem(rows: int, n: int, seed: int, density: float, tokens: int):
    """Features, targets, a mask and a prior for `rows` masked least-squares problems over `n` features."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(tokens, n, generator=g)
    t = torch.randn(tokens, rows, generator=g)
    mask = torch.rand(rows, n, generator=g) < density
    return f, t, mask, torch.randn(rows, n, generator=g)


@given(st.integers(1, 6), st.integers(2, 12), st.integers(0, 999), st.floats(0.2, 1.0))
def test_refit_rows_solves_each_masked_problem(rows, n, seed, density):
    f, t, mask, _ = masked_problem(rows, n, seed, density, tokens=50)
    got = refit_rows(f.T @ f, t.T @ f, mask, ridge=1e-6)
    assert not bool(got[~mask].any())
    for r in range(rows):
        s = mask[r]
        if s.any():
            ref = torch.linalg.lstsq(f[:, s].double(), t[:, r : r + 1].double()).solution.squeeze(1)
            torch.testing.assert_close(got[r, s].double(), ref, rtol=1e-3, atol=1e-3)


@given(st.integers(1, 6), st.integers(2, 12), st.integers(0, 999), st.floats(0.2, 1.0))
def test_conjugate_gradients_reach_the_exact_refit(rows, n, seed, density):
    from fpewiden.fpe.solvers import refit_cg

    f, t, mask, prior = masked_problem(rows, n, seed, density, tokens=80)
    exact = refit_rows(f.T @ f, t.T @ f, mask, 1e-2, prior)
    got, iterations = refit_cg(f.T @ f, t.T @ f, mask, 1e-2, prior, torch.zeros(rows, n), tol=1e-6, iters=200)
    assert not bool(got[~mask].any()) and iterations <= 200
    torch.testing.assert_close(got, exact, rtol=1e-3, atol=1e-3)
    # rows are independent problems: solved two rows at a time (the solver's memory bound) they reach it too
    blocked, _ = refit_cg(f.T @ f, t.T @ f, mask, 1e-2, prior, torch.zeros(rows, n), 1e-6, 200, 2 * 7 * 4 * n)
    assert not bool(blocked[~mask].any())
    torch.testing.assert_close(blocked, exact, rtol=1e-3, atol=1e-3)
    # written over the prior, which is also the start (calibrate_pair's use): the same rows, bit for bit
    own = prior.clone()
    into, _ = refit_cg(f.T @ f, t.T @ f, mask, 1e-2, own, own, 1e-6, 200, 2 * 7 * 4 * n, out=own)
    fresh, _ = refit_cg(f.T @ f, t.T @ f, mask, 1e-2, prior, prior, 1e-6, 200, 2 * 7 * 4 * n)
    assert into.data_ptr() == own.data_ptr() and torch.equal(into, fresh)


def test_obs_prunes_to_the_mask_and_compensates():
    from fpewiden.fpe.solvers import obs_prune

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 40, generator=g) @ torch.randn(40, 40, generator=g) * 0.3 + torch.randn(600, 40, generator=g)
    w = torch.randn(16, 40, generator=g)
    mask = torch.rand(16, 40, generator=g) < 0.5
    got = obs_prune(w, mask, x.T @ x)
    assert not bool(got[~mask].any())
    err = lambda v: float(((x @ (w - v).T) ** 2).sum())  # noqa: E731
    exact = refit_rows(x.T @ x, (x @ w.T).T @ x, mask, 1e-6)
    assert err(exact) <= err(got) < err(w * mask)  # between the exact refit and no refit
    torch.testing.assert_close(obs_prune(w, torch.ones_like(mask), x.T @ x), w)


@pytest.mark.parametrize("solver", ["obs", "cg"])
def test_the_scalable_solvers_keep_the_budget_and_approach_the_exact_one(solver):
    pair, x = pair_and_inputs(h=8, d=12, o=5, tokens=400)
    fn = PairFunction(torch.relu)
    budget = pair.nnz() // 2
    runs = {
        s: calibrate_pair(pair, x, fn, None, CalibratedOptions(alpha=2, solver=s), random_split, budget)
        for s in ("exact", solver)
    }
    exact, got = runs["exact"], runs[solver]
    assert got.pair.nnz() == budget and set(got.solvers) == {solver} and set(exact.solvers) == {"exact"}
    for a, b in zip([*exact.pair.m_in, exact.pair.m_out], [*got.pair.m_in, got.pair.m_out]):
        assert torch.equal(a, b)  # the same exact-budget mask: only the refit differs
    assert got.error_after < got.error_before
    assert got.error_after <= exact.error_after * (1.02 if solver == "cg" else 1.5)


def test_auto_takes_the_exact_solver_only_where_it_is_cheap(monkeypatch):
    from fpewiden.fpe import solvers

    pair, x = pair_and_inputs(h=8, d=12, o=5, tokens=400)
    fn = PairFunction(torch.relu)
    res = calibrate_pair(pair, x, fn, None, CalibratedOptions(alpha=2), random_split, pair.nnz() // 2)
    assert set(res.solvers) == {"exact"}
    monkeypatch.setattr(solvers, "EXACT_MAX", 0.0)
    res = calibrate_pair(pair, x, fn, None, CalibratedOptions(alpha=2), random_split, pair.nnz() // 2)
    assert set(res.solvers) == {solvers.SCALABLE}


@pytest.mark.parametrize("solver", ["exact", "cg", "obs"])
def test_refits_on_another_device_come_back_equal(solver):
    """The refits move to `device` and back (CUDA on a GPU machine); "cpu:0" is another device name here, so the
    moving path runs on CPU and must give the same pair."""
    pair, x = pair_and_inputs(h=8, d=12, o=5, tokens=400)
    fn = PairFunction(torch.relu)
    here, moved = (
        calibrate_pair(pair, x, fn, None, CalibratedOptions(alpha=2, solver=solver, device=d), random_split, 60)
        for d in ("cpu", "cpu:0")
    )
    for a, b in zip([*here.pair.w_in, here.pair.w_out], [*moved.pair.w_in, moved.pair.w_out], strict=True):
        assert torch.equal(a, b) and a.device.type == "cpu"
    assert here.ridges == moved.ridges


def test_convert_device_cuda_without_a_gpu_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from fpewiden.cli import app
    from tests.helpers import write_mlp

    src = write_mlp(tmp_path / "m.safetensors")
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((64, 12)).astype("float32"))
    args = ["convert", str(src), "--out", str(tmp_path / "o.safetensors"), "--calibration", str(data)]
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    res = CliRunner().invoke(app, [*args, "--device", "cuda"])
    assert res.exit_code == 2 and "no CUDA device is available" in res.output
    assert not (tmp_path / "o.safetensors").exists()


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3), st.integers(0, 999))
def test_keep_largest_matches_the_reference_sort(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    scores = [torch.round(torch.rand(r, c, generator=g) * 4) / 4 for r, c in shapes]  # many ties
    if seed % 2:  # signed scores (and -0.0) count by magnitude, as they do without a sign
        scores = [s * torch.where(torch.rand(s.shape, generator=g) < 0.5, -1.0, 1.0) for s in scores]
    masks = [torch.rand(r, c, generator=g) < 0.8 for r, c in shapes]
    budget = sum(int(m.sum()) for m in masks) // 2
    assert all(
        torch.equal(a, b) for a, b in zip(keep_largest(scores, masks, budget), reference.prune(scores, masks, budget))
    )


def random_split(pair, support, chosen):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(support.shape, generator=g) < 0.5).to(torch.int8)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_calibrate_pair_keeps_the_budget_and_the_refit_helps(fraction):
    pair, x = pair_and_inputs(h=8, d=12, o=5, tokens=400)
    fn = PairFunction(torch.relu)
    b_out = torch.randn(5)
    budget = pair.nnz() // 2
    opts = CalibratedOptions(alpha=2, fraction=fraction, importance="activation", reconstruct=True)
    res = calibrate_pair(pair, x, fn, b_out, opts, random_split, budget)
    assert res.pair.nnz() == budget and res.expanded == round(fraction * 8)
    assert res.pair.neurons == 8 + round(fraction * 8)
    for w, m in zip([*res.pair.w_in, res.pair.w_out], [*res.pair.m_in, res.pair.m_out]):
        assert not bool(w[~m].any())
    assert res.error_after < res.error_before
    target = pair_output(pair, x, fn, b_out)
    got = pair_output(res.pair, x, fn, res.b_out)
    assert float((got - target).norm() / target.norm()) == pytest.approx(res.error_after, rel=1e-4)


@pytest.mark.parametrize("gated", [False, True])
def test_token_chunks_give_the_whole_calibration(monkeypatch, gated):
    """Everything at the pair's width is worked through in token chunks (so the peak does not grow with tokens ×
    neurons): chunks of 37 tokens give the masks, weights, ridges and errors of one chunk, up to fp32 sums."""
    from fpewiden.fpe import calibrated

    g = torch.Generator().manual_seed(3)
    h, d, o, n = 12, 10, 6, 400
    w_in = [torch.randn(h, d, generator=g) for _ in range(2 if gated else 1)]
    pair = Pair(w_in, [torch.ones(h, d, dtype=torch.bool)] * len(w_in), [None] * len(w_in),
                torch.randn(o, h, generator=g), torch.ones(o, h, dtype=torch.bool))  # fmt: skip
    x, b_out = torch.randn(n, d, generator=g), torch.randn(o, generator=g)
    fn = PairFunction(torch.nn.functional.silu if gated else torch.relu, gated=gated)
    opts = CalibratedOptions(alpha=2, fraction=1.0)
    whole = calibrate_pair(pair, x, fn, b_out, opts, random_split, pair.nnz() // 2)
    monkeypatch.setattr(calibrated, "chunk_rows", lambda width: 37)
    chunked = calibrate_pair(pair, x, fn, b_out, opts, random_split, pair.nnz() // 2)
    for a, b in zip([*whole.pair.m_in, whole.pair.m_out], [*chunked.pair.m_in, chunked.pair.m_out], strict=True):
        assert torch.equal(a, b)
    for a, b in zip([*whole.pair.w_in, whole.pair.w_out], [*chunked.pair.w_in, chunked.pair.w_out], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert whole.ridges == chunked.ridges and whole.solvers == chunked.solvers
    assert chunked.error_after == pytest.approx(whole.error_after, rel=1e-4)
    assert chunked.error_before == pytest.approx(whole.error_before, rel=1e-5)


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_a_released_pair_is_freed_and_converts_the_same(fraction):
    """`release=True` (convert hands its pair over) empties the pair's weights and supports, and changes nothing
    in the result: calibrated pruning (the pair itself is worked on) and FPE (an expanded copy is)."""
    g = torch.Generator().manual_seed(5)
    h, d, o = 12, 10, 6

    def make() -> Pair:
        g.manual_seed(5)
        w, b = torch.randn(h, d, generator=g), torch.randn(h, generator=g)
        return Pair([w], [torch.ones(h, d, dtype=torch.bool)], [b],
                    torch.randn(o, h, generator=g), torch.ones(o, h, dtype=torch.bool))  # fmt: skip

    x = torch.randn(300, d, generator=g)
    fn, opts = PairFunction(torch.relu), CalibratedOptions(alpha=2, fraction=fraction)
    kept = calibrate_pair(make(), x, fn, None, opts, random_split, 60)
    given = make()
    freed = calibrate_pair(given, x, fn, None, opts, random_split, 60, release=True)
    assert all(t.numel() == 0 for t in (*given.w_in, given.w_out, *given.m_in, given.m_out))
    for a, b in zip([*kept.pair.w_in, kept.pair.w_out, *kept.pair.m_in, kept.pair.m_out],
                    [*freed.pair.w_in, freed.pair.w_out, *freed.pair.m_in, freed.pair.m_out], strict=True):  # fmt: skip
        assert torch.equal(a, b)
    assert kept.error_after == freed.error_after


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_a_refit_from_row_functions_in_chunks_equals_the_whole(solver):
    f, t, mask, prior = masked_problem(7, 9, 1, 0.6, 300)
    whole = calibrated_refit(f, t, mask, None, True, prior, torch.zeros(7), solver)
    calls = []

    def rows(part):
        calls.append(part)
        return f[part]

    chunked = calibrated_refit(rows, lambda part: t[part], mask, None, True, prior, torch.zeros(7), solver,
                               tokens=300, chunk=41)  # fmt: skip
    assert chunked.ridge == whole.ridge
    torch.testing.assert_close(chunked.w, whole.w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunked.b, whole.b, rtol=1e-4, atol=1e-5)
    assert max(p.stop - p.start for p in calls) <= 41  # never more than a chunk of rows at once


def test_calibrate_pair_without_pruning_or_widening_is_the_identity():
    pair, x = pair_and_inputs()
    res = calibrate_pair(
        pair, x, PairFunction(torch.relu), None, CalibratedOptions(alpha=2, fraction=0.0), random_split, pair.nnz()
    )
    assert res.error_after < 1e-5 and torch.equal(res.pair.m_out, pair.m_out)


def trained_digits_mlp(tmp_path, hidden=32, epochs=15):
    from fpewiden.data.specs import load_data
    from fpewiden.train.config import TrainConfig
    from fpewiden.train.finetune import finetune

    src = tmp_path / "init.safetensors"
    save_file(ChainMLP.fresh([64, hidden, 10], "relu", seed=0).tensors(), str(src))
    dense = tmp_path / "dense.safetensors"
    finetune(src, "digits", dense, TrainConfig(epochs=epochs, lr=1e-2, device="cpu"))
    return dense, load_data("digits")


def accuracy(path, data) -> float:
    from fpewiden.data.labels import evaluate
    from fpewiden.model.loaded import load_model

    return evaluate(load_model(path).model, data.x_val, data.y_val, data.kind)["accuracy"]


def test_calibrated_widening_keeps_an_mlp_accurate_before_fine_tuning(tmp_path):
    dense, data = trained_digits_mlp(tmp_path, hidden=8)
    base = accuracy(dense, data)
    plain, cal = tmp_path / "plain.safetensors", tmp_path / "cal.safetensors"
    convert(dense, plain, ConvertOptions(alpha=4))
    report = convert(dense, cal, ConvertOptions(alpha=4, calibration=Calibration(data="digits", select="all")))
    assert report["nnz_after"] == report["nnz_before"]
    assert open_checkpoint(cal).meta.calibration["layers"][0]["expanded"] == 8
    calibrated = accuracy(cal, data)
    assert calibrated >= 0.9 * base and calibrated > accuracy(plain, data)


def test_alpha_1_calibrated_is_pruning_with_exact_budget(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 16, 10, 3))
    x = torch.randn(300, 12)
    save_file({"x": x, "y": torch.randint(0, 3, (300,))}, str(tmp_path / "cal.safetensors"))
    out = tmp_path / "p.safetensors"
    report = convert(
        src,
        out,
        ConvertOptions(
            alpha=1, budget=Budget.parse("0.4"), calibration=Calibration(data=str(tmp_path / "cal.safetensors"))
        ),
    )
    assert report["nnz_after"] == round(0.4 * report["nnz_before"])
    assert load_file(out)["0.weight"].shape == (16, 12)
    errors = open_checkpoint(out).meta.calibration["layers"]
    assert all(e["output_error"] <= e["output_error_before_refit"] for e in errors)


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_hf_calibrated_convert_loads_with_the_planned_width(tmp_path, family):
    import transformers

    src = tiny_bert(tmp_path / "m") if family == "bert" else tiny_causal(tmp_path / "m", family)
    text = sentences(tmp_path / "cal.txt", 40)
    out = tmp_path / "o"
    res = runner.invoke(
        app,
        [
            str(a)
            for a in (
                "convert",
                src,
                "--out",
                out,
                "--budget",
                "0.6",
                "--calibration",
                text,
                "--expand-fraction",
                "0.25",
            )
        ],
    )
    assert res.exit_code == 0, res.output
    assert "note: on a pretrained MiniLM, widening with calibration stayed below calibrated pruning" in res.stderr
    meta = open_checkpoint(out).meta
    assert meta.budget == round(0.6 * meta.nnz_before)
    assert all(layer["expanded"] == 8 for layer in meta.calibration["layers"])  # 25% of 32 neurons
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("intermediate_size", cfg.get("n_inner")) == 32 + 8
    _, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_block_by_block_calibration_equals_running_the_whole_model(tmp_path, family, monkeypatch):
    """The onloaded path (one block in memory, hidden states carried) gives the whole-model path's conversion."""
    from safetensors.torch import load_file

    from fpewiden.convert import onload

    src = tiny_bert(tmp_path / "m") if family == "bert" else tiny_causal(tmp_path / "m", family)
    text = str(sentences(tmp_path / "cal.txt", 40))
    seen: list[int] = []
    seek = onload.OnloadedModel.seek
    monkeypatch.setattr(onload.OnloadedModel, "seek", lambda self, i: (seen.append(i), seek(self, i))[1])
    outs = {}
    for whole in (False, True):
        out = tmp_path / f"o{whole}"
        cal = Calibration(data=text, whole_model=whole)
        convert(src, out, ConvertOptions(alpha=2, budget=Budget.parse("0.6"), calibration=cal))
        outs[whole] = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert seen and sorted(set(seen)) == list(range(max(seen) + 1))  # the onloaded path ran, block by block
    assert outs[False].keys() == outs[True].keys()
    for k, v in outs[True].items():
        torch.testing.assert_close(outs[False][k], v, rtol=2e-4, atol=2e-5, msg=k)


def test_onloading_frees_each_block_once_passed(tmp_path):
    """Blocks behind the calibrated one and the embeddings hold no memory (their parameters are on meta)."""
    from fpewiden.convert.onload import OnloadedModel
    from fpewiden.io.checkpoint import open_checkpoint
    from fpewiden.model.skeleton import empty_model

    src = tiny_causal(tmp_path / "m", "llama")
    ck = open_checkpoint(src)
    model = empty_model(ck.path, head=False)
    batch = {"input_ids": torch.randint(0, 50, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    om = OnloadedModel.open(
        ck, model, [batch], [n for n in ck.shapes if ".mlp." in n], [batch["attention_mask"].bool()]
    )
    assert om is not None and om.blocks.count >= 2

    def live(mod: torch.nn.Module) -> int:
        return sum(p.device.type != "meta" for p in mod.parameters())

    assert live(model) == 0  # the embeddings ran once and were freed
    x0 = om.inputs(next(n for n in ck.shapes if n.endswith("0.mlp.up_proj.weight")), [batch["attention_mask"].bool()])
    assert x0.shape == (10, ck.config["hidden_size"]) and live(om.block(0)) > 0
    om.seek(1)
    assert live(om.block(0)) == 0 and live(om.block(1)) > 0
    with pytest.raises(AssertionError):
        om.seek(0)


def test_onloading_keeps_hidden_states_at_real_tokens_only(tmp_path):
    """Padded positions are not carried from block to block (a real token's output never reads them): the
    states hold the real tokens' rows, and a block gets them padded again with zeros."""
    from fpewiden.convert.onload import OnloadedModel, _hidden
    from fpewiden.io.checkpoint import open_checkpoint
    from fpewiden.model.skeleton import empty_model

    src = tiny_causal(tmp_path / "m", "llama")
    ck = open_checkpoint(src)
    model = empty_model(ck.path, head=False)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    batch = {"input_ids": torch.randint(0, 50, (2, 5)), "attention_mask": real.long()}
    om = OnloadedModel.open(ck, model, [batch], [n for n in ck.shapes if ".mlp." in n], [real])
    assert om is not None
    width = ck.config["hidden_size"]
    rows = _hidden(*om.states[0])
    assert rows.shape == (7, width)
    padded = _hidden(*om._padded(0))
    assert padded.shape == (2, 5, width) and not bool(padded[~real].any())
    assert torch.equal(padded[real], rows)
    om.seek(1)  # block 0 ran on the padded states; its outputs are kept at the real tokens again
    assert _hidden(*om.states[0]).shape == (7, width)


def _onloaded_llama(tmp_path, scratch=None):
    from fpewiden.convert.onload import OnloadedModel
    from fpewiden.io.checkpoint import open_checkpoint
    from fpewiden.model.skeleton import empty_model

    src = tiny_causal(tmp_path / "m", "llama") if not (tmp_path / "m").exists() else tmp_path / "m"
    ck = open_checkpoint(src)
    torch.manual_seed(0)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    batches = [{"input_ids": torch.randint(0, 50, (2, 5)), "attention_mask": real.long()} for _ in range(3)]
    model = empty_model(ck.path, head=False)
    om = OnloadedModel.open(ck, model, batches, [n for n in ck.shapes if ".mlp." in n], [real] * 3, scratch)
    assert om is not None
    return ck, om, [real] * 3


def test_onloading_parks_hidden_states_and_the_block_while_a_pair_calibrates(tmp_path):
    """Once a pair's inputs are captured the carried hidden states wait on disk and the block's weights are freed
    (nothing of either in memory); both come back bit for bit: the next block receives exactly what it gets when
    nothing is parked. A weight given to the block since (the converted pair's) is not read over."""
    from fpewiden.convert.onload import _hidden

    def up(ck, i):
        return next(n for n in ck.shapes if n.endswith(f"{i}.mlp.up_proj.weight"))

    def live(mod: torch.nn.Module) -> int:
        return sum(p.device.type != "meta" for p in mod.parameters())

    ck, om, real = _onloaded_llama(tmp_path, tmp_path)
    kept = [_hidden(*s).clone() for s in om.states]
    x = om.inputs(up(ck, 0), real)
    om.release(up(ck, 0))
    om.park()
    assert all(_hidden(*s).numel() == 0 for s in om.states) and live(om.block(0)) == 0
    assert not list(tmp_path.glob(".fpewiden-hidden-*"))  # unlinked: nothing is left if the process dies
    _, mod = om.module(up(ck, 0))
    given = torch.nn.Parameter(torch.randn_like(mod.weight, device="cpu"), requires_grad=False)
    mod.weight = given  # as the converted pair is put in
    om.seek(1)
    parked = [_hidden(*s) for s in om.states]

    ck, stay, real = _onloaded_llama(tmp_path)
    assert all(torch.equal(a, _hidden(*b)) for a, b in zip(kept, stay.states, strict=True))
    assert torch.equal(stay.inputs(up(ck, 0), real), x)
    stay.module(up(ck, 0))[1].weight = given
    stay.seek(1)
    assert all(torch.equal(a, _hidden(*b)) for a, b in zip(parked, stay.states, strict=True))


def test_hidden_states_that_cannot_be_parked_fail_in_one_line(tmp_path):
    from fpewiden.errors import FpewidenError

    ck, om, real = _onloaded_llama(tmp_path, tmp_path / "missing")
    om.inputs(next(n for n in ck.shapes if n.endswith("0.mlp.up_proj.weight")), real)
    with pytest.raises(FpewidenError, match=r"^calibration: cannot create a scratch file in .*missing"):
        om.park()


def test_only_the_command_tunes_malloc_for_the_process(tmp_path, monkeypatch):
    """glibc's mmap threshold (fpewiden/memory.py) is process-wide: `fpewiden convert --calibration` sets it at
    its entry, the library never does (a program that converts through it keeps its own malloc)."""
    import fpewiden.memory

    calls = []
    monkeypatch.setattr(fpewiden.memory, "return_freed_memory", lambda: calls.append(1) or True)
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 16, 3))
    data = tmp_path / "cal.safetensors"
    save_file({"x": torch.randn(64, 12)}, str(data))
    convert(src, tmp_path / "lib.safetensors", ConvertOptions(alpha=2, calibration=Calibration(data=str(data))))
    assert calls == []
    args = ["convert", str(src), "--out", str(tmp_path / "cli.safetensors"), "--calibration", str(data)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert calls == [1]
    res = CliRunner().invoke(app, ["convert", str(src), "--out", str(tmp_path / "plain.safetensors")])
    assert res.exit_code == 0 and calls == [1]  # no calibration: malloc left alone
