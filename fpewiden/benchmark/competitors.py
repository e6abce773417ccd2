"""The quantized competitors a deployment engineer tries first, built by bench from the reference model, so one
command puts them beside fpewiden's models (issue 31): each becomes a row of its own, with its own accuracy,
bytes and latency, on the same tables and Pareto plot.

  ort-int8    onnxruntime.quantization.quantize_dynamic of the reference's dense ONNX export (int8 weights,
              activations quantized per call): what `quantize_dynamic` gives a user by default
  ort-int4    MatMulNBits (4-bit weights, symmetric, blocks of 32 inputs) of the same export
  torch-int8  torch.ao.quantization.quantize_dynamic of the reference's torch model (nn.Linear → int8)

A competitor row runs in its base engine (`ort` or `torch`); bench times the reference in that engine too, so its
latency × is against the reference in the same runtime. Its bytes are what it stores: integer matrices, their
scales, and every float tensor as it is.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fpewiden.errors import FpewidenError

# engine -> (the engine its row runs in, how tables name it)
COMPETITORS = {"ort-int8": ("ort", "ORT int8"), "ort-int4": ("ort", "ORT 4-bit"), "torch-int8": ("torch", "torch int8")}
INT4_BLOCK = 32


def split_engines(engines: list[str]) -> tuple[list[str], list[str]]:
    """(engines every model runs in, competitors built from the reference)."""
    return [e for e in engines if e not in COMPETITORS], [e for e in engines if e in COMPETITORS]


def reference_engines(engines: list[str], competitors: list[str]) -> list[str]:
    """The reference's engines: the requested ones and each competitor's base engine (its latency ratio's baseline)."""
    return engines + sorted({COMPETITORS[c][0] for c in competitors} - set(engines))


def label(reference: str, competitor: str) -> str:
    return f"{reference} · {COMPETITORS[competitor][1]}"


def quantize_onnx(src: Path, out: Path, competitor: str) -> Path:
    """The ORT competitor of a dense ONNX file, written to `out`."""
    logging.disable(logging.WARNING)  # the quantizers log advice ("consider pre-processing") to the root logger
    try:
        if competitor == "ort-int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
            return out
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(src)), block_size=INT4_BLOCK, is_symmetric=True)
        q.process()
        q.model.save_model_to_file(str(out), use_external_data_format=False)
        return out
    except ImportError:
        raise FpewidenError(
            f"engine {competitor} needs onnxruntime's quantization tools (pip install onnxruntime)"
        ) from None
    except Exception as err:  # onnxruntime's quantizers raise their own types
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FpewidenError(f"engine {competitor}: ONNX Runtime could not quantize {src.name}: {why}") from None
    finally:
        logging.disable(logging.NOTSET)


def torch_int8(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` with every nn.Linear dynamically quantized to int8 (fpewiden's MLP layers first
    become nn.Linear, which is what torch's quantizer replaces)."""
    from fpewiden.model.chain_mlp import ChainLayer

    twin = copy.deepcopy(model).cpu().eval()
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ChainLayer):
                lin = nn.Linear(child.weight.shape[1], child.weight.shape[0], bias=child.bias is not None)
                lin.weight, lin.bias = child.weight, child.bias
                setattr(parent, name, lin)
    with warnings.catch_warnings():  # torch.ao's quantization warns of its deprecation on every call
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(twin, {nn.Linear}, dtype=torch.qint8)
    if not any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in q.modules()):
        raise FpewidenError("engine torch-int8: the reference has no nn.Linear for torch's int8 quantizer")
    return q


def torch_int8_bytes(q: nn.Module, moved: Callable[[str], bool] = lambda _n: True) -> int:
    """What the quantized model stores: each quantized Linear's int8 weight, its scale and zero point (one per
    tensor, torch's default) and fp32 bias; every other parameter and buffer as it is. `moved`: which tensors
    (by name) one inference reads (a language model's embedding tables are left out, as for every row)."""
    total = 0
    for name, m in q.named_modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear) and moved(f"{name}.weight"):
            bias = m.bias()
            total += m.in_features * m.out_features + 8 + (bias.numel() * 4 if bias is not None else 0)
    tensors = {**dict(q.named_buffers()), **dict(q.named_parameters())}
    return total + sum(t.numel() * t.element_size() for n, t in tensors.items() if moved(n))


def adopt_reference(e, ref, competitor: str) -> None:
    """What a quantized ONNX competitor shares with its reference: the path it was built from, its neurons, its
    fp32 bytes (the same weights unquantized) and, for 4-bit (whose packed nibbles are no count of weights), its
    non-zeros. int8 keeps its own count: a weight that rounds to 0 is gone."""
    e.path = ref.path
    e.info["neurons"] = ref.info["neurons"]
    e.info["bytes"]["dense_fp32"] = ref.info["bytes"]["dense_fp32"]
    if competitor == "ort-int4":
        e.info["nnz"] = ref.info["nnz"]


def stored_bytes_table(stored: int, dense_fp32: int) -> dict[str, int | None]:
    """bench's per-format bytes for a quantized model: only `stored` applies (and `dense_fp32`, the reference)."""
    from fpewiden.benchmark.formats import FORMATS

    return {f: None for f in FORMATS} | {"dense_fp32": dense_fp32, "stored": stored}


def quantized_export(ref, competitor: str, tmp: Path) -> Path:
    """The ORT competitor's file: the reference's dense ONNX export (the one bench already made, else a new one;
    an ONNX reference as it is) quantized into `tmp`."""
    from fpewiden.export.export import export

    src = ref.path if ref.path.suffix == ".onnx" else ref.exported
    if src is None:
        src = tmp / f"{len(list(tmp.iterdir()))}.onnx"
        export(ref.path, src, "dense", verify=False)
    return quantize_onnx(src, tmp / f"{len(list(tmp.iterdir()))}.{competitor}.onnx", competitor)


def torch_int8_entry(ref, device, load: Callable[[], nn.Module], moved: Callable[[str], bool] = lambda _n: True):
    """(the torch-int8 competitor's measured model, its quantized module) from the reference's torch model (`load`
    gives it): what it shares with the reference and the bytes it stores; the caller adds runner and scores."""
    from fpewiden.benchmark.measure import MeasuredModel

    if ref.path.suffix == ".onnx":
        raise FpewidenError("engine torch-int8 quantizes a torch model: give the reference as a checkpoint or folder")
    if device.type != "cpu":
        raise FpewidenError("engine torch-int8 runs on the CPU only (torch's dynamic int8 kernels): drop --device")
    q = torch_int8(load())
    e = MeasuredModel(ref.path)
    e.info.update({k: ref.info[k] for k in ("neurons", "nnz", "params")}, kind="quantized", ort_layout=None,
                  bytes=stored_bytes_table(torch_int8_bytes(q, moved), ref.info["bytes"]["dense_fp32"]))  # fmt: skip
    return e, q
