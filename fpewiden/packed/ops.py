"""The torch side of packed matrices: `PackedLinear`, the module that replaces an nn.Linear, over the
`fpewiden::packed_linear` op (csrc/torch_ops.cc; its fake kernel, registered by kernels.py, lets torch.compile
trace it).

Modes, chosen per call from the number of input rows (fpewiden/packed/crossover.py measures where each wins):
`gemv` streams the packed bytes once per 8 inputs (decode), `spmm` puts the batch in SIMD lanes with work
proportional to the non-zeros (prefill, encoders), `dense` unpacks to fp32 and calls torch's GEMM (large batches,
where the GEMM's efficiency beats skipping zeros).

int8 matrices (any layout) on the avx512 kernels with VNNI and VBMI2, or on the avx2 kernels, run `gemv` as
`gemv_q8`: the inputs quantized to int8 per row (max |x| / 127, as torch's and ONNX Runtime's dynamic int8 do) and
exact integer dot products (the same outputs on both); on the avx512 kernels with VNNI, token batches also have the
mode `int8_mm` (the same input rounding, the int8 values as dense rows, torch's int8 GEMM) (`activations="int8"`,
the default where an int8 path runs). Elsewhere, and with `activations="fp32"`, int8 values are widened to fp32 in
registers and the inputs stay fp32. int4 matrices run `gemv_q8` on VNNI too (the nibbles spread to bytes, each 64
columns' integer sums scaled by their groups' scales); their token batches run with fp32 inputs (each vector of
values times its group's scale as it is loaded).

Where the kernels decode a layout slower than the dense one (fpw_runs_spread in csrc/fpw_kernels.h: int8 and int4
bitmask matrices on the avx2 kernels, which have no expand instruction), the layer spreads its values to the
dense layout once, at construction, and `gemv` runs that; `spmm` (work by the non-zeros) runs the stored layout,
and the crossover picks per batch (sparse int4 token batches at low density win there;
bench/results/quantized/avx2_spread). The file stays small, memory holds both, and an export writes the stored
layout.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fpewiden.errors import FpewidenError
from fpewiden.packed import kernels
from fpewiden.packed.format import DTYPE_CODES, INT4, PackedMatrix, unpack

FORMAT_CODES = {"bitmask": 0, "parent": 1, "dense": 2}
MODES = ("gemv", "spmm", "dense")
Q8_MAX_COLS = 65536  # csrc/fpw_kernels.h FPW_Q8_MAX_COLS: int32 sums stay exact


_NO_BITS = torch.zeros(0, dtype=torch.uint8)  # the dense layout's (empty) bits
HUGE = 1 << 20  # tensors from this size on go to huge pages


def _resident(t: torch.Tensor, kernel: str) -> torch.Tensor:
    """Where the kernels read a large packed array from: memory backed by 2 MiB pages where the system allows."""
    if kernel == "torch" or t.numel() * t.element_size() < HUGE:
        return t.contiguous()
    return torch.ops.fpewiden.hugepage_copy(t)


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is packed: y = x Wᵀ + b for x (…, in_features), in x's dtype (computed in fp32).

    `kernel`: the path to run (fpewiden/packed/kernels.py; default: the widest this machine has). On the `torch`
    fallback the weight is unpacked once, at construction, and run densely. `table`: (batch, mode) pairs measured
    by crossover.py; n inputs run the mode of the smallest measured batch ≥ n. Until measured: `gemv` up to 8
    inputs, `spmm` above. `spread`: False keeps the stored layout where the kernels would spread it (less memory,
    slower; bench/avx2_spread.py measures both); None: as the kernels prefer.
    """

    def __init__(
        self,
        pm: PackedMatrix,
        bias: torch.Tensor | None = None,
        kernel: str | None = None,
        table: list[tuple[int, str]] | None = None,
        activations: str | None = None,
        spread: bool | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = pm.cols, pm.rows
        self.format, self.alpha, self.planes, self.stride, self.nnz = pm.format, pm.alpha, pm.planes, pm.stride, pm.nnz
        self.group = pm.group
        self.kernel = kernel or kernels.path()
        if self.kernel != "torch" and (reason := kernels.native_reason()) is not None:  # loads it otherwise
            raise FpewidenError(f"the {self.kernel} kernels cannot run: the packed kernels are {reason}")
        self.register_buffer("values", _resident(pm.values, self.kernel))
        self.register_buffer("bits", _resident(pm.bits, self.kernel))
        self.register_buffer("row_ptr", pm.row_ptr.contiguous() if pm.row_ptr is not None else None)
        self.register_buffer("scales", pm.scales.contiguous() if pm.scales is not None else None)
        self.register_buffer("bias", bias.detach().to(torch.float32).contiguous() if bias is not None else None)
        self.register_buffer("dense", unpack(pm).to(torch.float32) if self.kernel == "torch" else None)
        self.table = table
        self._fmt, self._dtype = FORMAT_CODES[pm.format], DTYPE_CODES[pm.values.dtype]
        self._spread = self._spread_values(pm) if spread is not False else None
        self.nbytes = pm.nbytes
        self.set_activations(activations)

    def _spread_values(self, pm: PackedMatrix) -> torch.Tensor | None:
        """The dense layout's values where this kernel runs `pm`'s layout slower (a plain attribute, not a buffer:
        state dicts and exports hold the stored layout)."""
        if self.kernel == "torch" or not torch.ops.fpewiden.runs_spread(self.kernel, self._fmt, self._dtype):
            return None
        spread = torch.ops.fpewiden.packed_spread(
            self.values, self.bits, self.row_ptr, pm.rows, pm.cols, self._fmt, self._dtype, pm.alpha, pm.planes,
            pm.stride, self.scales, pm.group,
        )  # fmt: skip
        return _resident(spread, self.kernel)

    @property
    def running(self) -> PackedMatrix:
        """The matrix `gemv` runs: the stored one (`packed`), or its values spread to the dense layout."""
        if self._spread is None:
            return self.packed
        rows, cols = self.out_features, self.in_features
        return PackedMatrix("dense", rows, cols, self._spread, _NO_BITS, 0, rows * cols, scales=self.scales,
                            group=self.group)  # fmt: skip

    def set_activations(self, activations: str | None) -> None:
        """`int8`: inputs quantized per row where an int8 path runs (gemv_q8, int8_mm); `fp32`: inputs stay fp32
        (the int8 values widened in registers: slower, closer to the unquantized model); None: int8 where it runs."""
        self._gemv_q8 = self._q8()
        self._int8_mm = self._int8_gemm()
        self.activations = activations or ("int8" if self._gemv_q8 or self._int8_mm else "fp32")
        if self.activations not in ("fp32", "int8"):
            raise ValueError(f"activations={self.activations!r}: fp32 or int8")
        if self.activations == "int8" and not (self._gemv_q8 or self._int8_mm):
            raise ValueError(
                "int8 activations need int8 values on the avx2 or avx512 kernels (int4: AVX-512 VNNI + VBMI2)"
            )
        if self.activations == "fp32":
            self._gemv_q8 = self._int8_mm = False

    def _q8(self) -> bool:
        """Whether the int8-activation kernel can run this layer's few-input calls."""
        if self.values.dtype not in (torch.int8, INT4) or self.in_features > Q8_MAX_COLS:
            return False
        return self.kernel in ("avx512", "avx2") and bool(torch.ops.fpewiden.has_q8(self.kernel, self._dtype))

    def _int8_gemm(self) -> bool:
        """Whether token batches can run torch's int8 GEMM on the int8 values (the dense layout's as stored, the
        others unpacked to int8 rows per call; int32 sums exact up to 65,536 inputs). Only where the CPU has VNNI
        (the unpack is a VNNI + VBMI2 kernel, and without VNNI oneDNN's s8·s8 GEMM saturates 16-bit partial
        sums; pytorch/pytorch#136746), so with the avx512 kernels only (a CPU with AVX-512 VNNI runs those unless
        another path is forced: the avx2 path forced there measures what an AVX2-only CPU runs), and never for
        fewer than 16 inputs (torch 2.13's CPU _int_mm is wrong for
        one input column). bench/int_mm_check.py measures both (bench/results/int_mm_check)."""
        return (self.values.dtype == torch.int8 and self.kernel == "avx512"
                and 16 <= self.in_features <= Q8_MAX_COLS and bool(torch.ops.fpewiden.has_vnni()))  # fmt: skip

    def modes(self) -> tuple[str, ...]:
        """The modes this layer can run: MODES, and `int8_mm` (inputs quantized per row, torch._int_mm on the
        int8 values, each output scaled once) for int8 layers with int8 activations."""
        return (*MODES, "int8_mm") if self._int8_mm else MODES

    @property
    def packed(self) -> PackedMatrix:
        return PackedMatrix(
            self.format, self.out_features, self.in_features, self.values, self.bits, self.stride, self.nnz,
            self.row_ptr, self.alpha, self.planes, scales=self.scales, group=self.group,
        )  # fmt: skip

    def mode(self, n: int) -> str:
        if self.table is None:
            return "gemv" if n <= 8 else "spmm"
        for batch, mode in self.table:
            if n <= batch:
                return mode
        return self.table[-1][1]

    def _mode(self, x2: torch.Tensor) -> str:
        # an export must not branch on the batch (it would fix the batch axis); the ONNX op picks its own mode
        return "gemv" if torch.compiler.is_exporting() else self.mode(len(x2))

    def forward(self, x: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        flat = x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous()
        x2 = x if flat else x.reshape(-1, self.in_features).to(torch.float32).contiguous()
        if self.kernel == "torch":
            y = F.linear(x2, self.dense, self.bias)
        else:
            mode = mode or self._mode(x2)
            if mode == "gemv" and self._gemv_q8:
                mode = "gemv_q8"
            spread = self._spread is not None and mode in ("gemv", "gemv_q8") and x2.is_cpu
            if spread and not torch.compiler.is_exporting():
                arrays = (self._spread, _NO_BITS, None, FORMAT_CODES["dense"], 1, 0, 0)
            else:
                arrays = (self.values, self.bits, self.row_ptr, self._fmt, self.alpha, self.planes, self.stride)
            values, bits, row_ptr, fmt, alpha, planes, stride = arrays
            y = torch.ops.fpewiden.packed_linear(
                x2, values, bits, row_ptr, self.bias, self.out_features, self.in_features, fmt, self._dtype, alpha,
                planes, stride, self.kernel, mode, self.scales, self.group,
            )  # fmt: skip
        return y if flat else y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"{'runs=dense, ' if self._spread is not None else ''}"
            f"dtype={'int4' if self.group else self.values.dtype}, "
            f"nnz={self.nnz}, kernel={self.kernel}, activations={self.activations}"
        )
