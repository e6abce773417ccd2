"""Packed weights: formats bit-exact both ways, every kernel path against the dense reference, the op under
torch.compile, packed checkpoints on disk (MLP and Hugging Face), the loader, bad files, the fallback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.errors import FpewidenError
from fpewiden.io.checkpoint import MASK_PREFIX, MASKS_FILE
from fpewiden.model.loaded import load_model
from fpewiden.packed import format as fmt
from fpewiden.packed import kernels
from fpewiden.packed.embedding import PackedEmbedding
from fpewiden.packed.ops import PackedLinear
from fpewiden.packed.pack import pack_checkpoint, unpack_checkpoint
from fpewiden.packed.reader import read_packed
from fpewiden.quantize import Grid, dequantize, expand_scales, quantize
from tests.helpers import tiny_bert, tiny_causal, write_mlp

runner = CliRunner()
PATHS = kernels.available()  # every compiled ISA this CPU runs, and the pure-torch fallback
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sparse(rows: int, cols: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    if rows > 3:
        w[1] = 0  # an empty row
    return w


def widened(parents: int, cols: int, alpha: int, keep: float = 0.8, seed: int = 0) -> torch.Tensor:
    """An FPE incoming matrix: each parent weight in one child (or pruned), children parent-major."""
    g = torch.Generator().manual_seed(seed)
    child = torch.randint(alpha, (parents, cols), generator=g)
    values = torch.randn(parents, cols, generator=g) * (torch.rand(parents, cols, generator=g) < keep)
    w = torch.zeros(parents, alpha, cols)
    w.scatter_(1, child.unsqueeze(1), values.unsqueeze(1))
    return w.view(parents * alpha, cols)


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ---------------------------------------------------------------- formats


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 70), st.integers(1, 150), st.floats(0.0, 1.0), st.sampled_from(DTYPES), st.integers(0, 99))
def test_bitmask_round_trip_is_bit_exact(rows, cols, density, dtype, seed):
    w = sparse(rows, cols, density, seed).to(dtype)
    w[0, : cols // 2] = -0.0  # the sign of a zero survives
    pm = fmt.pack_bitmask(w)
    assert pm.nnz == int((w != 0).sum()) and pm.row_ptr[-1] == pm.nnz
    assert pm.values.numel() == pm.nnz + fmt.PAD and pm.bits.numel() == rows * pm.stride and pm.stride % 8 == 0
    assert torch.equal(bits_of(fmt.unpack(pm)), bits_of(w))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.integers(1, 140), st.integers(2, 4), st.floats(0.0, 1.0), st.sampled_from(DTYPES))
def test_parent_round_trip_is_bit_exact(parents, cols, alpha, keep, dtype):
    w = widened(parents, cols, alpha, keep).to(dtype)
    pm = fmt.pack_parent(w, alpha)
    assert pm is not None and pm.planes == (1 if alpha == 2 else 2) and pm.nnz == parents * cols
    assert torch.equal(bits_of(fmt.unpack(pm)), bits_of(w))


def test_parent_refuses_what_is_not_a_partition():
    w = widened(4, 16, 2)
    w[1, 3] = w[0, 3] = 1.0  # input 3 feeds both children of parent 0
    assert fmt.pack_parent(w, 2) is None
    assert fmt.pack_parent(widened(4, 16, 2), 5) is None  # α outside 2..4


def test_the_smallest_format_wins_and_dense_stays_dense():
    assert fmt.best(torch.randn(32, 64)) is None  # no zeros: nothing is smaller than dense
    assert fmt.best(sparse(32, 64, 0.5)).format == "bitmask"
    # a pure partition (budget same, tied outgoing): the parent's values + 1 bit beat a bit per widened weight
    pm = fmt.best(widened(32, 64, 2, keep=1.0), alpha=2)
    assert pm.format == "parent" and pm.nbytes < fmt.pack_bitmask(widened(32, 64, 2, keep=1.0)).nbytes
    assert pm.nbytes == pytest.approx(32 * 64 * 4 * (1 + 1 / 32), rel=1e-9)  # 1.03× the parent's bytes


# ---------------------------------------------------------------- kernels against the dense reference


def int8_cases() -> list[fmt.PackedMatrix]:
    """int8 matrices in all three formats, with ragged shapes (columns past a vector, one row, one column)."""
    cases = [fmt.pack_bitmask(sparse(r, c, d), torch.int8) for r, c, d in ((37, 53, 0.5), (5, 300, 0.3), (1, 1, 1.0))]
    cases += [fmt.pack_parent(widened(p, c, a), a, torch.int8) for p, c, a in ((7, 33, 2), (3, 70, 3), (4, 17, 4))]
    cases += [fmt.pack_dense(sparse(r, c, 1.0, seed=r), torch.int8) for r, c in ((9, 70), (1, 16), (3, 1), (17, 129))]
    return cases


def int4_cases() -> list[fmt.PackedMatrix]:
    """int4 matrices in all three formats, groups of 16 to 128 columns, ragged shapes: odd value counts (a row's
    values start mid-byte), columns past a vector and past a group, one row, one column."""
    I4 = fmt.INT4
    cases = [
        fmt.pack_bitmask(sparse(r, c, d), I4, group=g)
        for r, c, d, g in ((37, 53, 0.5, 16), (5, 300, 0.3, 32), (1, 1, 1.0, 16), (6, 129, 0.7, 128))
    ]
    cases += [
        fmt.pack_parent(widened(p, c, a), a, I4, group=g)
        for p, c, a, g in ((7, 33, 2, 16), (3, 70, 3, 32), (4, 17, 4, 64))
    ]
    cases += [fmt.pack_dense(sparse(r, c, 1.0, seed=r), I4, group=g)
              for r, c in ((9, 71), (1, 16), (3, 1), (17, 129))
              for g in (16, 64)]  # fmt: skip
    return cases


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", (*DTYPES, torch.int8, fmt.INT4), ids=str)
def test_every_kernel_path_matches_the_dense_reference(path, dtype):
    """Every mode of every path, on every value type and format, computes with the weights `unpack` gives (int8,
    int4: q · scale, with fp32 inputs)."""
    g = torch.Generator().manual_seed(1)
    if dtype == torch.int8:
        cases = int8_cases()
    elif dtype == fmt.INT4:
        cases = int4_cases()
    else:
        cases = [fmt.pack_bitmask(sparse(r, c, d).to(dtype)) for r, c, d in ((37, 53, 0.5), (5, 300, 0.3), (1, 1, 1.0))]
        cases += [fmt.pack_parent(widened(p, c, a).to(dtype), a) for p, c, a in ((7, 33, 2), (3, 70, 3), (4, 17, 4))]
    for pm in cases:
        assert fmt.problem(pm) is None
        bias = torch.randn(pm.rows, generator=g)
        layer = PackedLinear(pm, bias, kernel=path, activations="fp32")
        ref_w = fmt.unpack(pm).double()
        for batch in (1, 3, 9, 70):
            x = torch.randn(batch, pm.cols, generator=g)
            ref = x.double() @ ref_w.T + bias.double()
            for mode in ("gemv", "spmm", "dense") if path != "torch" else (None,):
                y = layer(x, mode=mode)
                err = float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                assert err < 1e-5, (pm.format, pm.rows, pm.cols, batch, mode, err)


HAS_VNNI = "avx512" in PATHS and bool(torch.ops.fpewiden.has_vnni())
I8 = fmt.DTYPE_CODES[torch.int8]
Q8_PATHS = [p for p in ("avx512", "avx2") if p in PATHS and torch.ops.fpewiden.has_q8(p, I8)]
INT8_INPUTS = kernels.path() in Q8_PATHS  # int8 layers quantize their inputs on the kernels a model loads with


@pytest.mark.skipif(not Q8_PATHS, reason="no int8-input kernel on this CPU (AVX2, or AVX-512 VNNI + VBMI2)")
@pytest.mark.parametrize("path", Q8_PATHS)
def test_int8_activations_compute_exactly_the_quantized_product(path):
    """gemv_q8 (the default for int8 layers on AVX2 and on AVX-512 VNNI, int4 too there; every layout): inputs
    rounded per row to int8 at max |x| / 127, integer sums (int4: each 64 columns' sums times their groups' scales):
    equal to the double product of the rounded inputs and the dequantized weights."""
    g = torch.Generator().manual_seed(4)
    big = [fmt.pack_dense(sparse(5, 300, 1.0), fmt.INT4, group=16), fmt.pack_bitmask(sparse(6, 257, 0.4), fmt.INT4)]
    big += [fmt.pack_parent(widened(3, 201, 2), 2, fmt.INT4, group=128)]  # odd columns: rows start mid-byte
    wide = [fmt.pack_bitmask(sparse(3, 4111, 0.5), torch.int8), fmt.pack_parent(widened(2, 1000, 3), 3, torch.int8)]
    # inputs past the L1 cache: the avx2 kernel's column chunks, over blocks of 16 rows and a partial one
    wide += [fmt.pack_dense(sparse(3, 20000, 1.0), torch.int8), fmt.pack_bitmask(sparse(37, 9000, 0.3), torch.int8)]
    cases = int8_cases() + wide + (int4_cases() + big if path == "avx512" else [])
    for pm in cases:
        bias = torch.randn(pm.rows, generator=g)
        layer = PackedLinear(pm, bias, kernel=path)
        assert layer.activations == "int8"
        for batch in (1, 2, 3, 4, 5, 8):
            x = torch.randn(batch, pm.cols, generator=g) * torch.rand(batch, 1, generator=g) * 10
            x[0] = 0 if batch == 5 else x[0]  # a row of zeros: scale 1, every input 0
            sx = torch.where(x.abs().amax(1) > 0, x.abs().amax(1) / 127, torch.ones(batch))
            xq = torch.round(x / sx.view(-1, 1)).clamp(-127, 127)
            ref = (xq.double() * sx.double().view(-1, 1)) @ fmt.unpack(pm).double().T + bias.double()
            y = layer(x)
            err = float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            assert err < 1e-5, (pm.format, pm.rows, pm.cols, batch, err)
    with pytest.raises(ValueError, match="int8 activations need"):
        PackedLinear(fmt.pack_bitmask(sparse(8, 16, 0.5)), kernel=path, activations="int8")
    if path == "avx2":  # int4 values run the f32-input kernels there
        assert PackedLinear(fmt.pack_bitmask(sparse(8, 16, 0.5), fmt.INT4), kernel=path).activations == "fp32"


@pytest.mark.skipif(not {"avx512", "avx2"} <= set(Q8_PATHS), reason="needs both int8-input kernels")
def test_the_avx2_and_vnni_int8_kernels_agree_bit_for_bit():
    """Both sum exactly in int32 and scale alike: a model gives the same outputs on a Zen 3 and a Zen 4; on
    AVX2 from the stored bitmask or its spread values, one pass over the columns or chunks of them (rows of 9000 and
    17000 columns: several inputs outgrow the L1 cache)."""
    g = torch.Generator().manual_seed(6)
    wide = [fmt.pack_bitmask(sparse(7, 2053, 0.3), torch.int8), fmt.pack_bitmask(sparse(19, 9000, 0.4), torch.int8)]
    for pm in [*int8_cases(), *wide, fmt.pack_dense(sparse(18, 17000, 1.0), torch.int8)]:
        bias = torch.randn(pm.rows, generator=g)
        x = torch.randn(13, pm.cols, generator=g) * 3
        a, b = PackedLinear(pm, bias, kernel="avx512"), PackedLinear(pm, bias, kernel="avx2")
        kept = PackedLinear(pm, bias, kernel="avx2", spread=False)
        for batch in (1, 2, 5, 7, 8, 13):  # the VNNI kernel: dense rows 8 inputs a pass, then 4, then the rest
            want = a(x[:batch], mode="gemv")
            assert torch.equal(want, b(x[:batch], mode="gemv")), (pm.format, pm.cols, batch)
            assert torch.equal(want, kept(x[:batch], mode="gemv")), (pm.format, pm.cols, batch)


@pytest.mark.skipif("avx2" not in PATHS, reason="no AVX2 on this CPU")
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 200), st.floats(0.0, 1.0), st.booleans(), st.integers(0, 99))
def test_avx2_runs_quantized_bitmask_layers_spread_to_the_dense_layout(rows, cols, density, int4, seed):
    """Without an expand instruction the avx2 kernels run int8 and int4 bitmask matrices slower than dense
    (bench/results/quantized/avx2_spread): the layer spreads the values once, every one at its column, the scales
    unchanged, so the dense matrix it runs is bit for bit the stored one; the stored arrays stay what it holds."""
    dtype = fmt.INT4 if int4 else torch.int8
    pm = fmt.pack_bitmask(sparse(rows, cols, density, seed), dtype, group=16)
    layer = PackedLinear(pm, kernel="avx2")
    run = layer.running
    assert run.format == "dense" and fmt.problem(run) is None
    assert torch.equal(bits_of(fmt.unpack(run)), bits_of(fmt.unpack(pm)))
    assert torch.equal(layer.values, pm.values) and torch.equal(layer.bits, pm.bits)  # state dicts, exports
    kept = PackedLinear(pm, kernel="avx2", spread=False)
    assert kept.running.format == "bitmask"
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(layer(x, mode="gemv"), kept(x, mode="gemv"), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("avx2" not in PATHS, reason="no AVX2 on this CPU")
def test_only_quantized_bitmask_layers_on_avx2_are_spread():
    """The parent layout stays itself on avx2 (faster than its dense expansion at one input, measured), as does
    every float layout; and no other path spreads."""
    q8, q4 = fmt.pack_bitmask(sparse(9, 40, 0.5), torch.int8), fmt.pack_bitmask(sparse(9, 40, 0.5), fmt.INT4)
    parent = fmt.pack_parent(widened(5, 40, 2), 2, torch.int8)
    assert [PackedLinear(pm, kernel="avx2").running.format for pm in (q8, q4, parent)] == ["dense", "dense", "parent"]
    assert PackedLinear(fmt.pack_bitmask(sparse(9, 40, 0.5)), kernel="avx2").running.format == "bitmask"
    for path in {"avx512", "portable"} & set(PATHS):
        assert PackedLinear(q8, kernel=path).running.format == "bitmask"
    from fpewiden.packed import crossover  # a spread layer's modes are measured apart from the stored layout's

    spread, kept = PackedLinear(q8, kernel="avx2"), PackedLinear(q8, kernel="avx2", spread=False)
    assert crossover.key(spread) != crossover.key(kept)


@pytest.mark.skipif(not HAS_VNNI, reason="no VNNI on this CPU: oneDNN's int8 GEMM would saturate, so never used")
def test_token_batches_of_int8_layers_run_torchs_int8_gemm_exactly():
    """int8_mm (int8 layers of 16 inputs or more, VNNI CPUs, the avx512 kernels): inputs rounded per row as gemv_q8
    does, exact int32 sums from torch._int_mm, equal to the double product of the rounded inputs and the dequantized
    weights. A path forced on such a CPU runs what that path's CPUs run: no int8 GEMM."""
    g = torch.Generator().manual_seed(5)
    path = "avx512"
    for other in {"avx2", "portable"} & set(PATHS):
        assert "int8_mm" not in PackedLinear(fmt.pack_dense(sparse(3, 64, 1.0), torch.int8), kernel=other).modes()
    assert "int8_mm" not in PackedLinear(fmt.pack_dense(sparse(3, 15, 1.0), torch.int8), kernel=path).modes()
    cases = [c for c in int8_cases() if c.cols >= 16] + [fmt.pack_parent(widened(9, 130, 2), 2, torch.int8)]
    for pm in cases:  # every layout: the dense one's values as stored, the others unpacked to int8 rows
        bias = torch.randn(pm.rows, generator=g)
        layer = PackedLinear(pm, bias, kernel=path)
        assert "int8_mm" in layer.modes() and layer.activations == "int8"
        assert "int8_mm" not in PackedLinear(pm, bias, kernel=path, activations="fp32").modes()
        for batch in (1, 3, 17, 64):
            x = torch.randn(batch, pm.cols, generator=g) * 4
            x[0] = 0  # a row of zeros: scale 1, every input 0
            sx = torch.where(x.abs().amax(1) > 0, x.abs().amax(1) / 127, torch.ones(batch))
            xq = torch.round(x / sx.view(-1, 1)).clamp(-127, 127)
            ref = (xq.double() * sx.double().view(-1, 1)) @ fmt.unpack(pm).double().T + bias.double()
            y = layer(x, mode="int8_mm")
            assert float((y.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) < 1e-5


@pytest.mark.parametrize("path", [p for p in PATHS if p != "torch"])
def test_every_unpack_matches_the_reference(path):
    cases = [fmt.pack_bitmask(sparse(37, 70, 0.5).to(dt)) for dt in DTYPES]
    cases += [fmt.pack_parent(widened(5, 70, a), a) for a in (2, 3, 4)]
    cases += int8_cases() + int4_cases()
    for pm in cases:
        args = (pm.values, pm.bits, pm.row_ptr, pm.rows, pm.cols, fmt.FORMATS.index(pm.format),
                fmt.DTYPE_CODES[pm.dtype], pm.alpha, pm.planes, pm.stride, path, pm.scales, pm.group)  # fmt: skip
        fast = torch.ops.fpewiden.packed_unpack(*args)
        assert torch.equal(fast, torch.ops.fpewiden.packed_unpack(*args[:10], "reference", pm.scales, pm.group))
        assert torch.equal(fast, fmt.unpack(pm).float())


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 150),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_int8_quantization_keeps_the_mask_and_bounds_the_error(rows, cols, density, seed):
    """Zeros stay exactly zero and the mask is w's own; every kept weight is within half a step of its row's
    scale; each row's largest weight is exact; the smallest format holds the same weights."""
    w = sparse(rows, cols, density, seed)
    scales = (w.abs().amax(1) / 127).clamp_min(1e-30)
    for pm in (fmt.pack_bitmask(w, torch.int8), fmt.pack_dense(w, torch.int8), fmt.best(w, torch.int8)):
        assert fmt.problem(pm) is None
        d = fmt.unpack(pm)
        assert d.dtype == torch.float32
        if pm.format == "bitmask":  # the mask is w's own, whatever the kept values round to
            assert torch.equal(fmt._unpack_bits(pm.bits, rows, cols, pm.stride), w != 0)
        assert bool((d[w == 0] == 0).all())
        # half a step, up to the fp32 rounding of q · scale and of the difference (hypothesis found a weight at
        # exactly 33.5 steps: rounded to even, it lands half a step away, plus an ulp of the weight)
        slack = 4 * torch.finfo(torch.float32).eps * w.abs()
        assert bool(((d - w).abs() <= scales.view(-1, 1) / 2 * (1 + 1e-6) + slack).all())
        peak = w.abs().argmax(1, keepdim=True)
        assert torch.allclose(d.gather(1, peak), w.gather(1, peak), rtol=1e-6, atol=0)
    assert fmt.pack_bitmask(w, torch.int8).nnz == int((w != 0).sum())  # kept values rounding to 0 keep their place


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 24),
    cols=st.integers(1, 150),
    density=st.floats(0.0, 1.0),
    group=st.sampled_from([16, 32, 128]),
    seed=st.integers(0, 2**16),
)
def test_int4_values_round_trip_their_nibbles_and_keep_the_mask(rows, cols, density, group, seed):
    """Two values a byte, odd counts included: unpack gives q · scale for exactly the kept weights, every weight
    within half a step of its group's scale, each group's largest exact; the smallest format holds the same."""
    w = sparse(rows, cols, density, seed)
    pm = fmt.pack_bitmask(w, fmt.INT4, group=group)
    assert fmt.problem(pm) is None
    assert pm.values.numel() == (pm.nnz + 1) // 2 + fmt.PAD and pm.scales.numel() == rows * -(-cols // group)
    back = fmt.unpack(pm)
    assert torch.equal(back != 0, (back != 0) & (w != 0))
    step = expand_scales(pm.scales.view(rows, -1), cols, Grid(7, group))
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())
    q = quantize(back, pm.scales.view(rows, -1), Grid(7, group))
    assert bool((q.abs() <= 7).all()) and torch.equal(dequantize(q, pm.scales.view(rows, -1), Grid(7, group)),
                                                      back)  # fmt: skip
    small = fmt.best(w, fmt.INT4, group=group)
    assert torch.equal(fmt.unpack(small), back)


def test_int4_matrices_take_an_eighth_of_fp32s_value_bytes():
    w = sparse(64, 256, 0.5)
    f32, i4 = fmt.pack_bitmask(w), fmt.pack_bitmask(w, fmt.INT4, group=32)
    assert i4.nbytes == f32.nbytes - 4 * f32.nnz + (f32.nnz + 1) // 2 + 64 * 8 * 4  # plus 8 scales per row


def test_int8_matrices_take_a_quarter_of_fp32s_value_bytes():
    w = sparse(64, 256, 0.5)
    f32, i8 = fmt.pack_bitmask(w), fmt.pack_bitmask(w, torch.int8)
    assert i8.nbytes == f32.nbytes - 3 * f32.nnz + 64 * 4  # 1 byte a value instead of 4, plus a scale per row
    dense = fmt.best(sparse(64, 256, 1.0), torch.int8)
    assert dense.format == "dense" and dense.nbytes == 64 * 256 + 64 * 4


def test_the_op_traces_under_torch_compile():
    if "avx512" not in PATHS and "avx2" not in PATHS and "portable" not in PATHS:
        pytest.skip("no compiled kernels on this machine")
    layer = PackedLinear(fmt.pack_bitmask(sparse(24, 40, 0.5)), torch.randn(24), kernel="portable")
    x = torch.randn(4, 40)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), layer(x))


def test_the_environment_forces_a_path(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.path() == "torch"
    assert PackedLinear(fmt.pack_bitmask(sparse(8, 16, 0.5))).kernel == "torch"
    monkeypatch.setenv(kernels.ENV, "sse9")
    with pytest.raises(FpewidenError, match="choose one of"):
        kernels.path()


def test_without_the_library_the_fallback_runs_and_says_so_once(tmp_path):
    """A machine without a compiler: no library, so one line on stderr and dense execution, never a crash."""
    code = (
        f"import torch, fpewiden.packed.built as b; from pathlib import Path; b.BUILD = Path({str(tmp_path)!r});"
        "from fpewiden.packed import format as f, ops, kernels;"
        "m = ops.PackedLinear(f.pack_bitmask(torch.eye(4))); m2 = ops.PackedLinear(f.pack_bitmask(torch.eye(4)));"
        "print(m.kernel, float((m(torch.ones(1, 4)) - 1).abs().max()))"
    )
    env = {k: v for k, v in os.environ.items() if k != kernels.ENV}  # a forced path would not be a fallback
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["torch", "0.0"]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "running the pure-torch fallback" in lines[0] and "not built" in lines[0]


def test_set_up_without_a_compiler_says_so_in_one_line(tmp_path):
    """Set-up's build on a machine whose compiler is missing: one line per library naming the cause, exit 0."""
    code = (
        f"import fpewiden.packed.built as b, fpewiden.packed.build as m; from pathlib import Path; "
        f"b.BUILD = Path({str(tmp_path)!r}); m.main([])"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(lines) == 2 and all("no C++ compiler" in line for line in lines), lines
    assert "pure-torch fallback" in lines[0] and not list(tmp_path.rglob("*.so"))
    assert not (tmp_path / "ort-include").exists()  # nothing fetched for a build that cannot run


# ---------------------------------------------------------------- packed checkpoints


def mlp_pair(tmp_path: Path) -> tuple[Path, Path]:
    src = write_mlp(tmp_path / "m.safetensors", widths=(40, 24, 10))
    fpe = tmp_path / "fpe.safetensors"
    convert(src, fpe, ConvertOptions(alpha=2, outgoing="tied"))  # incoming: a pure partition (parent format)
    return src, fpe


def test_pack_and_unpack_an_mlp_bit_for_bit(tmp_path):
    src, fpe = mlp_pair(tmp_path)
    pruned = tmp_path / "half.safetensors"
    convert(src, pruned, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    for ckpt, formats in ((pruned, {"bitmask"}), (fpe, {"parent", "dense"})):
        out = tmp_path / f"{ckpt.stem}.packed.safetensors"
        report = pack_checkpoint(ckpt, out)
        assert {m["format"] for m in report["matrices"]} == formats
        assert report["packed_bytes"] < report["dense_bytes"]
        module = __import__("fpewiden.packed", fromlist=["load"]).load(out)
        ref = load_model(ckpt).model.eval()
        x = torch.randn(6, 40)
        with torch.no_grad():
            assert torch.allclose(module(x), ref(x), atol=1e-5, rtol=1e-5)
        back = tmp_path / f"{ckpt.stem}.back.safetensors"
        unpack_checkpoint(out, back)
        a, b = load_file(ckpt), load_file(back)
        assert a.keys() == b.keys() and all(torch.equal(bits_of(a[k]), bits_of(b[k])) for k in a)
        # convert writes pruned weights as +0.0, and the layouts encode the masks: neither is stored twice
        assert not any(((t == 0) & t.signbit()).any() for t in a.values() if t.is_floating_point())
        stored = load_file(out)
        packed_masks = {k[len(MASK_PREFIX) :] for k in stored if k.startswith(MASK_PREFIX)}
        assert not any("negzero" in k for k in stored) and packed_masks < {
            k[len(MASK_PREFIX) :] for k in a if k.startswith(MASK_PREFIX)
        }
        assert not packed_masks & {m["name"] for m in report["matrices"] if m["format"] != "dense"}


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_pack_a_transformers_model_and_generate(tmp_path, family):
    src = tiny_bert(tmp_path / "src", dropout=0.0) if family == "bert" else tiny_causal(tmp_path / "src", family)
    half = tmp_path / "half"
    convert(src, half, ConvertOptions(alpha=2, budget=Budget.parse("0.5")))
    res = runner.invoke(app, ["pack", str(half), "--out", str(tmp_path / "packed")])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "packed" / "model.safetensors").exists()  # transformers cannot half-load it by mistake
    from fpewiden import packed

    model = packed.load(tmp_path / "packed")
    ref = load_model(half, head=True).model.eval()
    assert type(model) is type(ref)
    n_packed = sum(type(m).__name__ == "PackedLinear" for m in model.modules())
    assert n_packed == 3 * 2 if family == "llama" else n_packed == 2 * 2
    ids = torch.randint(5, 90, (2, 7))
    with torch.no_grad():
        a, b = model(input_ids=ids), ref(input_ids=ids)
    ka = a.logits if hasattr(a, "logits") else a.last_hidden_state
    kb = b.logits if hasattr(b, "logits") else b.last_hidden_state
    assert torch.allclose(ka, kb, atol=1e-5, rtol=1e-4)
    if family != "bert":
        gen = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        assert torch.equal(gen, ref.generate(ids[:1], max_new_tokens=4, do_sample=False))
    res = runner.invoke(app, ["unpack", str(tmp_path / "packed"), "--out", str(tmp_path / "back")])
    assert res.exit_code == 0, res.output
    a, b = load_file(half / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(bits_of(a[k]), bits_of(b[k])) for k in a)
    # the masks the packed layouts encode are left out of the packed folder and derived again by unpack
    masks = load_file(half / MASKS_FILE)
    assert len(load_file(tmp_path / "packed" / MASKS_FILE)) < len(masks)
    back = load_file(tmp_path / "back" / MASKS_FILE)
    assert back.keys() == masks.keys() and all(torch.equal(back[k], masks[k]) for k in masks)
    import transformers

    transformers.AutoModel.from_pretrained(str(tmp_path / "back"))  # an ordinary folder again


def test_int8_packs_every_linear_and_unpacks_to_what_the_kernels_compute(tmp_path):
    """pack --dtype int8 on an MLP (pruned: bitmask; FPE: parent and dense) and a Llama (attention dense): every
    Linear weight is stored int8; the loaded model equals its own unpacked checkpoint run densely; the unpacked
    folder is an ordinary transformers model; the files hold about a quarter of fp32's value bytes."""
    src, fpe = mlp_pair(tmp_path)
    pruned = tmp_path / "half.safetensors"
    convert(src, pruned, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    for ckpt, formats in ((pruned, {"bitmask", "dense"}), (fpe, {"parent", "dense"})):
        out, back = tmp_path / f"{ckpt.stem}.i8.safetensors", tmp_path / f"{ckpt.stem}.i8back.safetensors"
        report = pack_checkpoint(ckpt, out, "int8")
        assert {m["format"] for m in report["matrices"]} <= formats and len(report["matrices"]) == 2
        f32 = pack_checkpoint(ckpt, tmp_path / "f32.safetensors", force=True)
        assert report["packed_bytes"] < f32["packed_bytes"] / 2
        unpack_checkpoint(out, back)
        module = __import__("fpewiden.packed", fromlist=["load"]).load(out)
        x = torch.randn(6, 40)
        with torch.no_grad():
            # the unpacked weights exactly, up to the inputs' own int8 rounding where int8 activations run
            ref8 = load_model(back).model.eval()(x)
            assert float((module(x) - ref8).norm() / ref8.norm()) < (0.01 if INT8_INPUTS else 1e-6)
            exact = __import__("fpewiden.packed", fromlist=["load"]).load(out, activations="fp32")  # inputs kept
            assert float((exact(x) - ref8).norm() / ref8.norm()) < 1e-6
            y, ref = module(x), load_model(ckpt).model.eval()(x)
            assert 0 < float((y - ref).norm() / ref.norm()) < 0.02  # int8's rounding, no more
        a, b = load_file(ckpt), load_file(back)
        weights = [k for k in a if k.endswith("weight") and "fpewiden" not in k]
        assert weights and all(bool((b[k][a[k] == 0] == 0).all()) for k in weights)  # no pruned weight revived
    src = tiny_causal(tmp_path / "llama", "llama")
    half = tmp_path / "llama-half"
    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    res = runner.invoke(app, ["pack", str(half), "--out", str(tmp_path / "i8"), "--dtype", "int8"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["unpack", str(tmp_path / "i8"), "--out", str(tmp_path / "i8back")])
    assert res.exit_code == 0, res.output
    from fpewiden import packed

    model = packed.load(tmp_path / "i8")
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]
    assert all(isinstance(m, PackedLinear) and m.scales is not None for m in linears[:-1])  # the LM head aside
    # the (untied) embedding table: int8 rows with a scale each, looked up without a dense copy
    table = model.get_input_embeddings()
    assert isinstance(table, PackedEmbedding) and table.values.dtype == torch.int8
    assert read_packed(tmp_path / "i8").entries["model.embed_tokens.weight"].format == "dense"
    ids = torch.randint(5, 90, (2, 7))
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "i8back")).eval()
    assert torch.equal(ref.get_input_embeddings()(ids), table(ids))  # unpack wrote q · scale, the lookup's values
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, ref(input_ids=ids).logits
        assert float((a - b).norm() / b.norm()) < (0.01 if INT8_INPUTS else 1e-5)


def test_bf16_values_halve_the_bytes(tmp_path):
    _, fpe = mlp_pair(tmp_path)
    r32 = pack_checkpoint(fpe, tmp_path / "a.safetensors")
    r16 = pack_checkpoint(fpe, tmp_path / "b.safetensors", dtype="bf16")
    packed32 = sum(m["packed_bytes"] for m in r32["matrices"] if m["format"] != "dense")
    packed16 = sum(m["packed_bytes"] for m in r16["matrices"] if m["format"] != "dense")
    assert packed16 < 0.55 * packed32
    assert read_packed(tmp_path / "b.safetensors").entries["0.weight"].dtype == "BF16"


def test_cli_pack_inspect_and_convert_packed(tmp_path):
    src, fpe = mlp_pair(tmp_path)
    res = runner.invoke(app, ["pack", str(fpe), "--out", str(tmp_path / "p.safetensors")])
    assert res.exit_code == 0 and "parent" in res.stdout and "kernels:" in res.stdout, res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "p.safetensors"), "--json"])
    report = json.loads(res.stdout)
    assert report["what"].startswith("packed: widened by FPE") and report["packed_bytes"] < report["dense_bytes"]
    res = runner.invoke(app, ["pack", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "q.safetensors")])
    assert res.exit_code == 2 and "packed already" in res.stderr
    res = runner.invoke(
        app, ["finetune", str(tmp_path / "p.safetensors"), "--data", "digits", "--out", str(tmp_path / "f")]
    )
    assert res.exit_code == 2 and "is a packed checkpoint" in res.stderr and "fpewiden unpack" in res.stderr
    out = tmp_path / "c.safetensors"
    res = runner.invoke(app, ["convert", str(src), "--out", str(out), "--alpha", "1", "--budget", "0.5", "--packed"])
    assert res.exit_code == 0, res.output
    assert read_packed(out).meta.alpha == 1 and not [p for p in tmp_path.iterdir() if p.name.startswith(".c.")]
    res = runner.invoke(app, ["convert", str(src), "--out", str(out), "--alpha", "2", "--packed"])  # same source
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- bad packed files: one line, never a crash


def corruptions(path: Path) -> list[tuple[str, bytes]]:
    data = path.read_bytes()
    (n,) = __import__("struct").unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header["__metadata__"]
    entries = json.loads(meta["fpewiden.packed"])
    name = next(iter(entries))
    out = [("truncated", data[: len(data) // 2]), ("empty", b""), ("header only", data[: 8 + n])]

    def with_entry(**change) -> bytes:
        e = dict(entries)
        e[name] = {**e[name], **change}
        h = dict(header, __metadata__={**meta, "fpewiden.packed": json.dumps(e)})
        blob = json.dumps(h).encode()
        blob += b" " * (-len(blob) % 8)
        return len(blob).to_bytes(8, "little") + blob + data[8 + n :]

    out += [("rows", with_entry(rows=10**6)), ("nnz", with_entry(nnz=3)), ("stride", with_entry(stride=8 * 999))]
    out += [("format", with_entry(format="csr")), ("alpha", with_entry(format="parent", alpha=9))]
    bits_name = f"fpewiden_packed.bits.{name}"
    start = 8 + n + header[bits_name]["data_offsets"][0]
    flipped = bytearray(data)
    flipped[start] ^= 0x01  # one bit more or less than the row offsets say
    out.append(("flipped bit", bytes(flipped)))
    return out


def test_corrupt_packed_files_are_one_line(tmp_path):
    src, _ = mlp_pair(tmp_path)
    half = tmp_path / "half.safetensors"
    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    good = tmp_path / "good.safetensors"
    pack_checkpoint(half, good)
    for what, blob in corruptions(good):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(blob)
        res = runner.invoke(app, ["inspect", str(bad)])
        assert res.exit_code == 2, (what, res.output)
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, res.stderr)
        with pytest.raises(FpewidenError):
            __import__("fpewiden.packed", fromlist=["load"]).load(bad)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10**6), st.integers(0, 255))
def test_random_byte_flips_never_crash(tmp_path, where, value):
    src = write_mlp(tmp_path / "m.safetensors", widths=(20, 12, 4))
    half = tmp_path / "h.safetensors"
    if not half.exists():
        convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
        pack_checkpoint(half, tmp_path / "g.safetensors")
    data = bytearray((tmp_path / "g.safetensors").read_bytes())
    data[where % len(data)] = value
    (tmp_path / "x.safetensors").write_bytes(bytes(data))
    try:
        module = __import__("fpewiden.packed", fromlist=["load"]).load(tmp_path / "x.safetensors")
    except FpewidenError:
        return
    # what survived the checks is a valid matrix (a flipped value, a name the loader does not read) and runs
    assert all(fmt.problem(m.packed) is None for m in module.modules() if isinstance(m, PackedLinear))
    assert module(torch.randn(2, 20)).shape == (2, 4)


def test_crossover_is_measured_once_per_shape_and_cached(monkeypatch):
    from fpewiden.packed import crossover

    if PATHS == ["torch"]:
        pytest.skip("no compiled kernels on this machine")
    layer = PackedLinear(fmt.pack_bitmask(sparse(48, 80, 0.5)), kernel=PATHS[0])
    crossover.tune([layer])
    assert [n for n, _ in layer.table] == list(crossover.BATCHES)
    assert {m for _, m in layer.table} <= set(layer.modes())
    assert layer.mode(3) == dict(layer.table)[4] and layer.mode(10**6) == layer.table[-1][1]
    assert crossover.key(layer) in json.loads(crossover.cache_file().read_text())

    def no_measuring(_layer, *a):
        raise AssertionError("measured a shape the cache holds")

    monkeypatch.setattr(crossover, "measure", no_measuring)
    twin = PackedLinear(fmt.pack_bitmask(sparse(48, 80, 0.5, seed=3)), kernel=PATHS[0])
    crossover.tune([twin])
    assert twin.table == layer.table


def test_a_sharded_model_packs_unpacks_and_loads(tmp_path):
    import transformers

    src = tiny_causal(tmp_path / "src", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="8KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / f).write_bytes((src / f).read_bytes())
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    half = tmp_path / "half"
    convert(tmp_path / "sharded", half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")), packed=True)
    assert (half / "model.packed.safetensors.index.json").is_file()
    from fpewiden import packed

    ids = torch.randint(5, 90, (1, 6))
    with torch.no_grad():
        got = packed.load(half)(input_ids=ids).logits
    unpack_checkpoint(half, tmp_path / "back")
    back = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert back["weight_map"] == index["weight_map"]
    ref = load_model(tmp_path / "back", head=True).model.eval()
    with torch.no_grad():
        assert torch.allclose(got, ref(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_pack_says_where_sparse_quantized_layers_run_slower_than_dense(monkeypatch):
    """On the avx2 kernels the sparse int8/int4 layouts decode no faster than dense ones (no expand instruction):
    pack says so, with where that was measured; nowhere else, and not for fp32 or dense matrices."""
    report = {"matrices": [{"dtype": "I8", "format": "bitmask"}, {"dtype": "U8", "format": "parent"},
                           {"dtype": "I8", "format": "dense"}, {"dtype": "F32", "format": "bitmask"}]}  # fmt: skip
    monkeypatch.setattr(kernels, "path", lambda: "avx2")
    note = kernels.slower_here(report)
    assert note is not None and "(2 here)" in note and kernels.AVX2_SPREAD in note
    assert (Path(__file__).resolve().parent.parent / kernels.AVX2_SPREAD).is_file()
    assert kernels.slower_here({"matrices": report["matrices"][2:]}) is None
    monkeypatch.setattr(kernels, "path", lambda: "avx512")
    assert kernels.slower_here(report) is None
