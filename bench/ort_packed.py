"""Packed models in ONNX Runtime (`export --layout packed`, the PackedMatMul op) against ORT's dense MatMul and
fpewiden's torch runtime, on the Llama-7B FFN pair 4096→11008→4096 (ReLU between), through the real pipeline:

  original   the dense pair (random weights, uniform ±1/√fan-in)
  50%        `convert --alpha 1 --budget 0.5`: half of each matrix's weights, bitmask format
  fpe        `convert --alpha 2` (budget same): 22,016 hidden neurons at the original's non-zeros

Each is packed (`fpewiden pack`) and exported twice: dense (`export`, zeros stored) and packed (`export --layout
packed`, verified in ORT against torch). Timed in one process, round-robin in a fresh random order per round,
medians: ORT dense and ORT packed sessions (intra-op threads = --threads, no spinning), fpewiden's torch runtime
(`fpewiden.packed.load`, measured modes) and torch dense. Ratios against ORT dense of the original in the same round.
Also the file bytes against the original's dense export, and, with onnxruntime-extensions installed, what its
Python custom ops (the route needing no ORT headers) cost per call.

With `--dtype int8|int4` every model is packed with quantized values (the original too, in the dense layout) and
the original's `quantize_dynamic` int8 export joins as "original ORT int8", what a user gets in one line.

  python bench/ort_packed.py [--threads 1,2 --batches 1,4,16,32 --dtype int8 --out bench/results/ort_packed]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packed import cpu_name, timed  # bench/packed.py

from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.export.export import export
from fpewiden.io.provenance import MD_MARKER, json_document
from fpewiden.packed import kernels
from fpewiden.packed.pack import pack_checkpoint

HIDDEN, FFN = 4096, 11008


def timed_rounds(fns: dict, rounds: int) -> dict[str, dict]:
    """bench/packed.py's interleaved timing, for exactly `rounds` rounds."""
    return timed(fns, 0.0, min_rounds=rounds, max_rounds=rounds)


def file_bytes(p: Path) -> int:
    data = p.with_name(p.name + ".data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def build(work: Path, dtype: str | None = None) -> dict[str, dict]:
    torch.manual_seed(0)
    up = torch.empty(FFN, HIDDEN).uniform_(-1, 1) / HIDDEN**0.5
    down = torch.empty(HIDDEN, FFN).uniform_(-1, 1) / FFN**0.5
    src = work / "original.safetensors"
    save_file({"0.weight": up, "2.weight": down}, str(src))
    convert(src, work / "50%.safetensors", ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    convert(src, work / "fpe.safetensors", ConvertOptions(alpha=2))
    models = {}
    for name in ("original", "50%", "fpe"):
        ck = work / f"{name}.safetensors"
        t = time.perf_counter()
        export(ck, work / f"{name}.dense.onnx", verify=False)
        models[name] = {"dense_onnx": work / f"{name}.dense.onnx", "dense_export_s": time.perf_counter() - t}
        if name == "original" and dtype is None:
            continue
        pk = work / f"{name}.packed.safetensors"
        report = pack_checkpoint(ck, pk, dtype)
        t = time.perf_counter()
        res = export(pk, work / f"{name}.packed.onnx", layout="packed")
        models[name].update(packed=pk, packed_onnx=work / f"{name}.packed.onnx", verify=res["verify"],
                            packed_export_s=time.perf_counter() - t,
                            formats=[m["format"] for m in report["matrices"]])  # fmt: skip
        print(json.dumps({name: {k: str(v) for k, v in models[name].items()}}), flush=True)
    if dtype is not None:  # the one-line competitor: ORT's dynamic int8 of the original's dense export
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = work / "original.int8.onnx"
        quantize_dynamic(str(models["original"]["dense_onnx"]), str(q), weight_type=QuantType.QInt8)
        models["original"]["ort_int8_onnx"] = q
    base = file_bytes(models["original"]["dense_onnx"])
    for m in models.values():
        m["bytes"] = {k: file_bytes(m[k]) / base for k in ("dense_onnx", "packed_onnx", "ort_int8_onnx") if k in m}
    return models


def sessions(models: dict, threads: int) -> dict:
    import onnxruntime as ort

    from fpewiden.model.loaded import load_model
    from fpewiden.packed import load as load_packed
    from fpewiden.packed.ort import session_options

    def opts(packed: bool):
        o = session_options(threads) if packed else ort.SessionOptions()
        o.intra_op_num_threads = threads
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return o

    runs = {}
    for name, m in models.items():
        s = ort.InferenceSession(str(m["dense_onnx"]), opts(False), providers=["CPUExecutionProvider"])
        runs[f"{name} ORT dense"] = lambda x, s=s: s.run(None, {"x": x.numpy()})
        tm = load_model(m["dense_onnx"].with_name(f"{name}.safetensors")).model.eval()
        runs[f"{name} torch dense"] = lambda x, tm=tm: tm(x)
        if "ort_int8_onnx" in m:
            s = ort.InferenceSession(str(m["ort_int8_onnx"]), opts(False), providers=["CPUExecutionProvider"])
            runs[f"{name} ORT int8"] = lambda x, s=s: s.run(None, {"x": x.numpy()})
        if "packed_onnx" in m:
            s = ort.InferenceSession(str(m["packed_onnx"]), opts(True), providers=["CPUExecutionProvider"])
            runs[f"{name} ORT packed"] = lambda x, s=s: s.run(None, {"x": x.numpy()})
            pm = load_packed(m["packed"])
            runs[f"{name} torch packed"] = lambda x, pm=pm: pm(x)
    return runs


def pyop_overhead() -> dict | None:
    """onnxruntime-extensions' Python custom op: per-call cost with a small input, with a 100 MB input (what a
    packed Llama-7B FFN matrix's values are), and with an 11,008-wide output."""
    try:
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime_extensions import PyCustomOpDef, default_opset_domain, get_library_path, onnx_op
    except ImportError:
        return None
    import onnxruntime as ort

    @onnx_op(op_type="FpewidenProbe", inputs=[PyCustomOpDef.dt_float, PyCustomOpDef.dt_float],
             outputs=[PyCustomOpDef.dt_float], attrs={"rows": PyCustomOpDef.dt_int64})  # fmt: skip
    def probe(x, w, rows):
        return np.zeros((x.shape[0], rows), np.float32)

    out = {}
    for label, n, rows in (("small", 1000, 16), ("100 MB input", 25_000_000, 16), ("11008 outputs", 1000, 11008)):
        w = numpy_helper.from_array(np.zeros(n, np.float32), "w")
        node = helper.make_node("FpewidenProbe", ["x", "w"], ["y"], domain=default_opset_domain(), rows=rows)
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
        g = helper.make_graph([node], "g", [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid(default_opset_domain(), 1)]
        so = ort.SessionOptions()
        so.register_custom_ops_library(get_library_path())
        s = ort.InferenceSession(helper.make_model(g, opset_imports=opsets).SerializeToString(), so)
        x = np.ones((1, 4), np.float32)
        r = timed_rounds({label: lambda s=s, x=x: s.run(None, {"x": x})}, 20)
        out[label] = r[label]["median_ms"]
    return out


def markdown(doc: dict) -> str:
    m = doc["models"]
    lines = [
        "# Packed models in ONNX Runtime",
        "",
        f"`{doc['command']}`",
        "",
        f"CPU: {doc['cpu']}; kernels: {doc['kernels']}; onnxruntime {doc['onnxruntime']}, torch {torch.__version__}. "
        f"Llama-7B FFN pair 4096→11008→4096 (ReLU), packed values {doc.get('dtype') or 'fp32'}. "
        "Latency: medians of interleaved rounds, as ratios against "
        "ORT dense of the original in the same round (ms in brackets).",
        "",
        "## File bytes against the original's dense export",
        "",
        "| model | formats | dense export | packed export | packed export: verify (max rel. error) |",
        "|---|---|---|---|---|",
    ]
    for name, v in m.items():
        lines.append(
            f"| {name} | {' + '.join(v.get('formats', ['dense']))} | {v['bytes']['dense_onnx']:.3f}× | "
            + (f"**{v['bytes']['packed_onnx']:.3f}×** | {v['verify']['max_rel_error']:.1e} |" if "packed_onnx" in
               v['bytes'] else "- | - |")
        )  # fmt: skip
    lines += ["", "## Latency", "", "| threads | batch | " + " | ".join(doc["engines"]) + " |",
              "|---|---|" + "---|" * len(doc["engines"])]  # fmt: skip
    for r in doc["rows"]:
        base = r["timings"]["original ORT dense"]["median_ms"]
        ms = {e: r["timings"][e]["median_ms"] for e in doc["engines"]}
        cells = [f"{ms[e] / base:.2f}× ({ms[e]:.1f})" for e in doc["engines"]]
        lines.append(f"| {r['threads']} | {r['batch']} | " + " | ".join(cells) + " |")
    if doc.get("pyop_ms"):
        lines += ["", "## onnxruntime-extensions Python ops (not used: why)", "",
                  "Per call, an op that returns zeros at once: " +
                  ", ".join(f"{k}: {v:.2f} ms" for k, v in doc["pyop_ms"].items()) +
                  ". The inputs are copied into Python on every call and the output goes back through a Python list, "
                  "so a packed Llama-7B matrix (about 100 MB of values) would cost more per call to hand over than the "
                  "whole dense multiply."]  # fmt: skip
    return "\n".join(lines) + f"\n\n{MD_MARKER}\n"


def main() -> None:
    import onnxruntime

    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--dtype", default=None, help="pack with int8 or int4 values")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ort_packed"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        models = build(Path(d), args.dtype)
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            runs = sessions(models, threads)
            for b in [int(x) for x in args.batches.split(",")]:
                x = torch.randn(b, HIDDEN)
                with torch.inference_mode():
                    res = timed_rounds({k: (lambda f=f, x=x: f(x)) for k, f in runs.items()}, args.rounds)
                rows.append({"threads": threads, "batch": b, "timings": res})
                base = res["original ORT dense"]["median_ms"]
                ratios = {k: round(v["median_ms"] / base, 3) for k, v in res.items()}
                print(json.dumps({"threads": threads, "batch": b, **ratios}), flush=True)
            del runs
    engines = list(rows[0]["timings"])
    for m in models.values():
        for k in ("dense_onnx", "packed_onnx", "packed", "ort_int8_onnx"):
            m.pop(k, None)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    doc = {"command": command, "cpu": cpu_name(), "kernels": kernels.path(), "onnxruntime": onnxruntime.__version__,
           "models": models, "engines": engines, "rows": rows, "pyop_ms": pyop_overhead(),
           "dtype": args.dtype}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(json_document(doc), indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
