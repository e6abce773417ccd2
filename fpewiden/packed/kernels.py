"""Which packed kernels run: the compiled library (built at set-up by fpewiden/packed/build.py) with the widest
ISA this CPU has, or the pure-torch fallback where there is no library. `FPEWIDEN_KERNEL` forces a path:
`avx512`, `avx2`, `portable` (the compiled variants) or `torch` (the fallback), so every path can be tested on one
machine. The fallback is announced once per process, in one line on stderr.
"""

from __future__ import annotations

import functools
import os
import sys

from fpewiden.errors import FpewidenError

ENV = "FPEWIDEN_KERNEL"
PATHS = ("avx512", "avx2", "portable", "torch")


@functools.cache
def _native() -> str | None:
    """Load the library; None when loaded, else why not."""
    import torch

    from fpewiden.packed.built import library, source_hash, stamp

    lib = library()
    if not lib.is_file():
        return "not built (no C++ compiler at set-up? run: python -m fpewiden.packed.build)"
    built = stamp() or {}
    if built.get("torch") != torch.__version__:
        return (
            f"built for torch {built.get('torch')}, this is {torch.__version__} (run: python -m fpewiden.packed.build)"
        )
    if built.get("sources") != source_hash():
        return "built from other sources (run: python -m fpewiden.packed.build)"
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError) as e:
        return f"cannot be loaded ({str(e).splitlines()[0][:160]})"

    @torch.library.register_fake("fpewiden::packed_linear")
    def _(x, values, bits, row_ptr, bias, rows, cols, fmt, dtype, alpha, planes, stride, isa, mode, scales=None,
          group=0):  # fmt: skip
        return x.new_empty((x.shape[0], rows))

    _register_cuda()
    return None


def _register_cuda() -> None:
    """On a GPU, the op's CUDA dispatch runs the Triton kernels (triton_kernels.py); CUDA builds of torch ship
    triton. Nothing to do (and nothing imported) without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return
    try:
        from fpewiden.packed.triton_kernels import linear
    except ImportError:
        print("fpewiden: triton is not installed; packed layers on CUDA tensors cannot run", file=sys.stderr)
        return
    torch.library.register_kernel("fpewiden::packed_linear", "cuda", linear)


def native_reason() -> str | None:
    """Why the compiled kernels are unavailable (None: they are loaded)."""
    return _native()


@functools.cache
def _announce(reason: str) -> None:
    print(f"fpewiden: packed kernels {reason}; running the pure-torch fallback (dense speed)", file=sys.stderr)


def path() -> str:
    """The kernel path packed layers run: an ISA name, or `torch` for the fallback."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced and forced not in PATHS:
        raise FpewidenError(f"{ENV}={forced!r}: choose one of {', '.join(PATHS)}")
    if forced == "torch":
        return "torch"
    reason = _native()
    if reason is not None:
        if forced:
            raise FpewidenError(f"{ENV}={forced}: the packed kernels are {reason}")
        _announce(reason)
        return "torch"
    import torch

    if forced:
        if not torch.ops.fpewiden.has_isa(forced):
            raise FpewidenError(f"{ENV}={forced}: this CPU cannot run the {forced} kernels")
        return forced
    return str(torch.ops.fpewiden.best_isa())


def available() -> list[str]:
    """Every path this machine can run (the fallback always)."""
    if _native() is not None:
        return ["torch"]
    import torch

    return [isa for isa in PATHS[:3] if torch.ops.fpewiden.has_isa(isa)] + ["torch"]


AVX2_SPREAD = "bench/results/quantized/avx2_spread/results.md"


def slower_here(report: dict) -> str | None:
    """What `pack` must say where a packed file would run no faster than its dense counterpart on this machine:
    on the avx2 kernels (no expand instruction) int8 and int4 matrices decode no faster than dense ones (bitmask
    layers are spread to the dense layout at load, which memory then holds beside the packed arrays; the parent
    layout loses to dense from 16 inputs: AVX2_SPREAD); None elsewhere."""
    sparse = [r for r in report["matrices"] if r.get("dtype") in ("I8", "U8") and r["format"] in ("bitmask", "parent")]
    if not sparse or path() != "avx2":
        return None
    return (
        f"this CPU runs the avx2 kernels, where sparse int8 and int4 layers ({len(sparse)} here) decode no faster "
        f"than dense ones: bitmask layers are spread to dense values when loaded, held in memory beside the packed "
        f"ones ({AVX2_SPREAD}). This file is the smaller one; for the least memory at the same speed on this "
        "machine, pack the unpruned model with --dtype int8"
    )
