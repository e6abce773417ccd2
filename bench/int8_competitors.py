"""What a deployment engineer tries first, against fpewiden's packed formats: one line of dynamic int8 quantization.

The Llama-7B FFN pair 4096→11008→4096 (ReLU, random weights), one process, one thread unless named, rounds in
random order (bench/packed.py's timer), medians; latency ratios against torch's dense fp32 in the same rounds:

  torch fp32       the dense pair, F.linear
  torch int8       torch.ao.quantization.quantize_dynamic (int8 weights, activations quantized per call)
  ORT fp32 / int8  the dense pair as ONNX (MatMul + Add) in ONNX Runtime, and onnxruntime.quantization's
                   quantize_dynamic of that file (no spinning, intra-op threads as torch's)
  packed 50%       each matrix with a random half of its weights kept, packed (bitmask) and run by fpewiden's
                   kernels in the mode crossover.py measured
  fpewiden int8    the dense pair packed with int8 values (`pack --dtype int8`: the dense format, a scale per row);
                   up to 8 inputs on AVX-512 VNNI + VBMI2 the inputs are quantized per row to int8 (integer dot
                   products, as the competitors do), elsewhere fp32 inputs and the values widened in registers
  50% + int8       packed 50%'s matrices with int8 values (bitmask + int8)
  FPE α=2 + int8   the pair converted by fpewiden (α=2, same non-zeros), packed with int8 values (parent layout up,
                   bitmask down); against fpewiden int8 of the original it is the paper's premise at int8 bytes
  ORT 4-bit        MatMulNBits (symmetric, blocks of 32 inputs) of the dense export, what bench's ort-int4 builds
  fpewiden int4    the dense pair packed with 4-bit values (`pack --dtype int4`: a scale per 32 inputs of a row),
                   int8 inputs where VNNI runs, as fpewiden int8
  50% + int4       packed 50%'s matrices with 4-bit values (bitmask + int4)

  python bench/int8_competitors.py [--batches 1,16 --threads 1 --out bench/results/int8_competitors]

The baseline issue 31 asks fpewiden to beat.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packed import half, timed  # bench/packed.py: the interleaved timer, the 50% matrices

from fpewiden.benchmark.competitors import quantize_onnx
from fpewiden.benchmark.machine import cpu_name
from fpewiden.packed import crossover, kernels
from fpewiden.packed import format as fmt
from fpewiden.packed.ops import PackedLinear

HIDDEN, FFN = 4096, 11008


class Pair(nn.Module):
    def __init__(self, up: nn.Module, down: nn.Module):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def dense_pair(seed: int) -> tuple[nn.Linear, nn.Linear]:
    g = torch.Generator().manual_seed(seed)
    up, down = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)
    with torch.no_grad():
        for lin in (up, down):
            lin.weight.uniform_(-1, 1, generator=g).div_(lin.in_features**0.5)
            lin.bias.zero_()
    return up.requires_grad_(False), down.requires_grad_(False)


def onnx_pair(up: nn.Linear, down: nn.Linear, path: Path) -> Path:
    """The pair as plain ONNX MatMul + Add + Relu, weights as initializers (what an export of it holds)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("w1", up.weight.T.contiguous().numpy()), ("b1", up.bias.numpy()),
        ("w2", down.weight.T.contiguous().numpy()), ("b2", down.bias.numpy()))]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["y"])]  # fmt: skip
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", HIDDEN]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "pair", io[:1], io[1:], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return path


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def fpe_int8(up: nn.Linear, down: nn.Linear, work: Path) -> Pair:
    """The pair converted by fpewiden at α=2 (same non-zero count), packed with int8 values."""
    from safetensors.torch import save_file

    from fpewiden.convert import ConvertOptions, convert
    from fpewiden.packed.pack import pack_checkpoint
    from fpewiden.packed.reader import read_packed

    save_file({"0.weight": up.weight.data.contiguous(), "2.weight": down.weight.data.contiguous()},
              str(work / "pair.safetensors"))  # fmt: skip
    convert(work / "pair.safetensors", work / "fpe.safetensors", ConvertOptions(alpha=2))
    pack_checkpoint(work / "fpe.safetensors", work / "fpe.i8.safetensors", "int8")
    pc = read_packed(work / "fpe.i8.safetensors")
    return Pair(PackedLinear(pc.packed("0.weight")), PackedLinear(pc.packed("2.weight"), down.bias))


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of interleaved rounds per measurement")
    ap.add_argument("--out", type=Path, default=Path("bench/results/int8_competitors"))
    args = ap.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    up, down = dense_pair(0)
    fp32 = Pair(up, down).eval()
    int8 = torch.ao.quantization.quantize_dynamic(Pair(up, down), {nn.Linear}, dtype=torch.qint8).eval()
    g = torch.Generator().manual_seed(1)
    halves = half(FFN, HIDDEN, 2), half(HIDDEN, FFN, 3)
    packed = Pair(PackedLinear(fmt.pack_bitmask(halves[0]), up.bias),
                  PackedLinear(fmt.pack_bitmask(halves[1]), down.bias))  # fmt: skip
    own = Pair(PackedLinear(fmt.pack_dense(up.weight, torch.int8), up.bias),
               PackedLinear(fmt.pack_dense(down.weight, torch.int8), down.bias))  # fmt: skip
    half8 = Pair(PackedLinear(fmt.pack_bitmask(halves[0], torch.int8), up.bias),
                 PackedLinear(fmt.pack_bitmask(halves[1], torch.int8), down.bias))  # fmt: skip
    own4 = Pair(PackedLinear(fmt.pack_dense(up.weight, fmt.INT4), up.bias),
                PackedLinear(fmt.pack_dense(down.weight, fmt.INT4), down.bias))  # fmt: skip
    half4 = Pair(PackedLinear(fmt.pack_bitmask(halves[0], fmt.INT4), up.bias),
                 PackedLinear(fmt.pack_bitmask(halves[1], fmt.INT4), down.bias))  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fpe8 = fpe_int8(up, down, Path(tmp))
        models = {"packed 50%": packed, "fpewiden int8": own, "50% + int8": half8, "FPE α=2 + int8": fpe8,
                  "fpewiden int4": own4, "50% + int4": half4}  # fmt: skip
        crossover.tune([m for pair in models.values() for m in (pair.up, pair.down)])
        weight_bytes = {k: pair.up.nbytes + pair.down.nbytes for k, pair in models.items()}
        dense_onnx = onnx_pair(up, down, Path(tmp) / "dense.onnx")
        int8_onnx = Path(tmp) / "int8.onnx"
        quantize_dynamic(str(dense_onnx), str(int8_onnx), weight_type=QuantType.QInt8)
        int4_onnx = quantize_onnx(dense_onnx, Path(tmp) / "int4.onnx", "ort-int4")
        sizes = {"ORT fp32": file_bytes(dense_onnx), "ORT int8": file_bytes(int8_onnx),
                 "ORT 4-bit": file_bytes(int4_onnx)}  # fmt: skip
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            sessions = {"ORT fp32": ort_session(dense_onnx, threads), "ORT int8": ort_session(int8_onnx, threads),
                        "ORT 4-bit": ort_session(int4_onnx, threads)}  # fmt: skip
            for batch in map(int, args.batches.split(",")):
                x = torch.randn(batch, HIDDEN, generator=g)
                xn = x.numpy()
                fns = {
                    "torch fp32": lambda x=x: fp32(x),
                    "torch int8": lambda x=x: int8(x),
                    "ORT fp32": lambda xn=xn, s=sessions: s["ORT fp32"].run(None, {"x": xn}),
                    "ORT int8": lambda xn=xn, s=sessions: s["ORT int8"].run(None, {"x": xn}),
                    "ORT 4-bit": lambda xn=xn, s=sessions: s["ORT 4-bit"].run(None, {"x": xn}),
                }
                fns |= {name: (lambda x=x, m=m: m(x)) for name, m in models.items()}
                with torch.inference_mode():
                    t = timed(fns, args.budget)
                base = t["torch fp32"]["median_ms"]
                for name, r in t.items():
                    rows.append({"threads": threads, "batch": batch, "engine": name, "median_ms": r["median_ms"],
                                 "ratio": r["median_ms"] / base, "rounds": r["rounds"]})  # fmt: skip
    cpu = cpu_name()
    forced = os.environ.get(kernels.ENV)  # a forced ISA is part of the command that reproduces the numbers
    command = (f"{kernels.ENV}={forced} " if forced else "") + "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"command": command, "cpu": cpu, "kernels": kernels.path(), "file_bytes": sizes,
           "weight_bytes": weight_bytes, "rows": rows}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Dynamic int8 and 4-bit quantization against fpewiden's packed formats (Llama-7B FFN pair, "
             "4096→11008→4096)", "",
             f"`{command}`", "", f"CPU: {cpu}; fpewiden kernels: {kernels.path()}; torch {torch.__version__}. Latency "
             "ratios against torch's dense fp32 in the same interleaved rounds (medians); lower is faster.", "",
             "| threads | batch | engine | median ms | latency × torch fp32 |", "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['threads']} | {r['batch']} | {r['engine']} | {r['median_ms']:.2f} | {r['ratio']:.2f}× |")
    mb = {k: v / 1e6 for k, v in sizes.items()}
    own_mb = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in weight_bytes.items())
    onnx_mb = ", ".join(f"{k[4:]} {v:.0f} MB" for k, v in mb.items())
    lines += ["", f"ONNX files: {onnx_mb}. fpewiden's weight bytes "
              f"(values, bits, offsets, scales): {own_mb}. Where a competitor's ratio is below fpewiden's at a "
              "batch, the competitor wins there."]  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
