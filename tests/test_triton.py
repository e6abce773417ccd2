"""The Triton kernels (fpewiden/packed/triton_kernels.py) on CPU tensors under TRITON_INTERPRET=1: every format,
value dtype and mode against the dense reference, on ragged shapes with empty rows. Speed is measured on a GPU
(bench/gpu_check.sh), never here."""

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpewiden.packed import format as fmt
from fpewiden.packed.ops import FORMAT_CODES, PackedLinear

pytest.importorskip("triton")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def tk():
    """The kernels, interpreted on CPU tensors (conftest.py sets TRITON_INTERPRET before triton is imported)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("a GPU is present: bench/gpu_check.sh checks the Triton kernels on it")
    import fpewiden.packed.triton_kernels as module

    return module


def bitmask(rows: int, cols: int, density: float, dtype: torch.dtype, seed: int = 0) -> fmt.PackedMatrix:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)
    w[:: max(1, rows // 3)] = 0  # empty rows
    return fmt.pack_bitmask(w.to(dtype).float(), dtype)


def parent(parents: int, cols: int, alpha: int, dtype: torch.dtype, seed: int = 0) -> fmt.PackedMatrix:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(parents, cols, generator=g)
    p[parents // 2] = 0  # a parent with no weights
    child = torch.randint(alpha, (parents, cols), generator=g)
    w = torch.zeros(parents, alpha, cols).scatter_(1, child.unsqueeze(1), p.unsqueeze(1)).view(-1, cols)
    pm = fmt.pack_parent(w.to(dtype).float(), alpha, dtype)
    assert pm is not None
    return pm


def run(tk, pm: fmt.PackedMatrix, n: int, mode: str, bias: bool, seed: int = 0) -> None:
    """The kernel through the op's own argument list (as PackedLinear passes it) against float64 dense."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(pm.rows, generator=g) if bias else None
    layer = PackedLinear(pm, b, kernel="portable")
    x = torch.randn(n, pm.cols, generator=g)
    args = (layer.values, layer.bits, layer.row_ptr, layer.bias, pm.rows, pm.cols, FORMAT_CODES[pm.format])
    y = tk.linear(x, *args, layer._dtype, pm.alpha, pm.planes, pm.stride, "triton", mode, layer.scales, pm.group)
    want = x.double() @ fmt.unpack(pm).double().T + (b.double() if bias else 0)
    assert y.shape == (n, pm.rows) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode,n", [("gemv", 3), ("spmm", 19)])
def test_bitmask_kernels_match_dense(tk, dtype, mode, n):
    run(tk, bitmask(37, 45, 0.4, dtype), n, mode, bias=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [2, 3, 4])
@pytest.mark.parametrize("mode,n", [("gemv", 2), ("spmm", 17)])
def test_parent_kernels_match_dense(tk, dtype, alpha, mode, n):
    run(tk, parent(13, 45, alpha, dtype), n, mode, bias=alpha != 3)


def quantized_cases() -> list[fmt.PackedMatrix]:
    """int8 (a scale per row; parent: per parent) and int4 (per row and group of 16 or 32 columns) in the bitmask,
    parent and dense layouts, ragged: odd value counts (int4 rows start mid-byte), columns past a group."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(23, 45, generator=g) * (torch.rand(23, 45, generator=g) < 0.5)
    p2 = parent(7, 45, 2, torch.float32, seed=1)
    wide = fmt.unpack(p2)
    cases = []
    for dtype, group in ((torch.int8, 0), (fmt.INT4, 16), (fmt.INT4, 32)):
        kw = {"group": group} if group else {}
        cases += [fmt.pack_bitmask(w, dtype, **kw), fmt.pack_parent(wide, 2, dtype, **kw)]
        cases += [fmt.pack_dense(torch.randn(9, 37, generator=g), dtype, **kw)]
    return cases


@pytest.mark.parametrize("mode,n", [("gemv", 3), ("spmm", 18)])
def test_int8_and_int4_values_in_every_layout_match_dense(tk, mode, n):
    """The weights format.unpack gives (q · scale), in registers: the CPU kernels' matrices on a GPU."""
    for pm in quantized_cases():
        assert fmt.problem(pm) is None
        run(tk, pm, n, mode, bias=pm.format != "dense")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 70),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    n=st.integers(1, 20),
    seed=st.integers(0, 1000),
)
def test_bitmask_any_shape_either_mode(tk, rows, cols, density, n, seed):
    run(tk, bitmask(rows, cols, density, torch.float32, seed), n, "gemv" if n <= 8 else "spmm", bias=seed % 2 == 0)


def test_an_empty_batch_and_the_mode_by_batch(tk):
    pm = bitmask(9, 20, 0.5, torch.float32)
    layer = PackedLinear(pm, kernel="portable")
    args = (layer.values, layer.bits, layer.row_ptr, None, 9, 20, 0, 0, 1, 0, pm.stride)
    assert tk.linear(torch.zeros(0, 20), *args).shape == (0, 9)
    run(tk, pm, 12, "dense", bias=False)  # the CPU's unpack-and-GEMM mode runs the token-batch kernel here
    with pytest.raises(ValueError, match="float32"):
        tk.linear(torch.zeros(2, 20, dtype=torch.float64), *args)


def test_the_cuda_dispatch_is_registered_only_with_a_gpu(tk, monkeypatch):
    from fpewiden.packed import kernels

    seen = []
    monkeypatch.setattr(torch.library, "register_kernel", lambda op, key, fn: seen.append((op, key, fn.__name__)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kernels._register_cuda()
    assert seen == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kernels._register_cuda()
    assert seen == [("fpewiden::packed_linear", "cuda", "linear")]
    monkeypatch.undo()
    kernels.path()  # the op is loaded; registering needs no GPU, and the dispatcher then has the CUDA kernel
    torch.library.register_kernel("fpewiden::packed_linear", "cuda", tk.linear)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fpewiden::packed_linear", "CUDA")


def test_the_gpu_kernels_refuse_what_the_cpu_validator_refuses(tk):
    """The same gate as the CPU op (format.problem, the mirror of csrc/validate.cc), before a matrix's first run
    and after an in-place edit."""
    from tests.test_packed_validation import corrupt_matrices

    for what, pm, why in corrupt_matrices():  # int8 and int4 ones too: their scales and groups are checked alike
        args = (pm.values, pm.bits, pm.row_ptr, None, pm.rows, pm.cols, FORMAT_CODES[pm.format])
        with pytest.raises(RuntimeError, match=re.escape(f"invalid packed matrix: {why}")):
            tk.linear(torch.ones(1, pm.cols), *args, fmt.DTYPE_CODES[pm.dtype], pm.alpha, pm.planes, pm.stride,
                      "triton", "", pm.scales, pm.group)  # fmt: skip
        assert what
    pm = bitmask(9, 70, 0.5, torch.float32)
    args = (pm.values, pm.bits, pm.row_ptr, None, pm.rows, pm.cols, 0, 0, 1, 0, pm.stride)
    ok = tk.linear(torch.ones(2, 70), *args)
    pm.row_ptr[3] += 1  # the version moves: checked again
    with pytest.raises(RuntimeError, match="offset difference"):
        tk.linear(torch.ones(2, 70), *args)
    pm.row_ptr[3] -= 1
    torch.testing.assert_close(tk.linear(torch.ones(2, 70), *args), ok)
