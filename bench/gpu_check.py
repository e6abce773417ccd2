"""The GPU paths in one short prepared run, and their CPU twin (`--dry-run`, run by the test suite).

CI never has a GPU, so every CUDA path of fpewiden has a CPU-tested twin; this script runs the CUDA side once on a
lent GPU machine (bench/gpu_check.sh) and prints one line per check, `ok` or `FAIL` with the reason:

  1. the main job (`fpewiden run polysemantic`, seed 0) with fine-tuning on the device (bf16 autocast on CUDA);
  2. finetune of an FPE MLP on the device: zero pattern kept, non-zeros unchanged, loss down;
  3. the same under torchrun (1 process; NCCL on CUDA, gloo on CPU);
  4. Hugging Face: a tiny BERT and a tiny Llama built offline, converted (tied outgoing; calibrated), distilled
     from their originals on the device: masks kept, tie kept;
  5. `fpewiden bench --engines torch` on the device: an MLP (1024→4096→1024 on CUDA, 256→1024→256 dry) dense,
     FPE α=2, shared+tied and shared+grouped (2:4-compatible), latency at batch 1/32/1024 (the structures on
     cuBLAS) and whether torch's 2:4 kernels ran;
  6. the same through ONNX Runtime's CUDA provider (the fast layout where the structure allows; skipped with a
     note where onnxruntime-gpu is not installed);
  7. calibrated conversion's refits on the device: one Llama-7B-shaped gated pair 4096→11008→4096 (256→704→256
     dry), 4,096 calibration rows, α=1 and α=2 at half the non-zeros, solver auto (conjugate gradients at this
     width): seconds, exact budget, held-out output error;
  8. the packed formats' Triton kernels (fpewiden/packed/triton_kernels.py) against cuBLAS on Llama-7B FFN shapes
     (11008×4096 and 4096×11008 at 50%, bitmask; FPE α=2's widened 22016×4096 incoming matrix, parent format,
     against the original 11008×4096), fp16 values, batch 1/4/16/32: exact against the dense product, latency
     ratios (CUDA events, interleaved, medians); ORT's CUDA provider on the dense matrix where onnxruntime-gpu is
     installed. Dry: 176×64 shapes under TRITON_INTERPRET=1 (exactness only).

  bash bench/gpu_check.sh            # on a GPU machine
  python bench/gpu_check.py --dry-run  # the CPU twin
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the offline tiny models of the test suite

DNF = "dnf:inputs=32,clauses=16,literals=3,outputs=clauses,n=4000"


def fpewiden(*args: object, torchrun: bool = False) -> subprocess.CompletedProcess:
    pre = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun else []
    cmd = [sys.executable, *pre, "-m", "fpewiden", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    if res.returncode:
        raise AssertionError(f"fpewiden {' '.join(map(str, args))} exited {res.returncode}: {res.stderr[-1500:]}")
    return res


def same_masks(before: Path, after: Path) -> int:
    """Checks every stored mask survived fine-tuning; returns the non-zero count after."""
    from fpewiden.io.checkpoint import open_checkpoint

    a, b = open_checkpoint(before), open_checkpoint(after)
    names = list(a.packed_masks)
    assert names, f"{before} stores no masks"
    for n in names:
        assert not ((b.get(n) != 0) & ~a.mask(n)).any(), f"{n}: a fixed zero became non-zero"
    from fpewiden.inspect import inspect_checkpoint

    return inspect_checkpoint(after)["totals"]["nnz"]


def check_main_job(device: str, work: Path) -> str:
    fpewiden("run", "polysemantic", "--out", work / "run", "--seeds", "0", "--device", device)
    rows = {
        s["model"]: s["exact_match"]["mean"] for s in json.loads((work / "run" / "results.json").read_text())["summary"]
    }
    dense, fpe = rows["dense"], rows["FPE α=2 random"]
    assert fpe > dense, f"FPE {fpe:.3f} not above dense {dense:.3f}"
    return f"exact match dense {dense:.3f}, FPE α=2 random {fpe:.3f} (CPU, 3 seeds: 0.400 / 0.979)"


def _mlp_pair(work: Path) -> tuple[Path, Path]:
    from helpers import write_mlp

    from fpewiden.convert import ConvertOptions, convert

    src = write_mlp(work / "mlp.safetensors", widths=(32, 8, 16))  # sized for DNF
    conv = work / "fpe.safetensors"
    convert(src, conv, ConvertOptions(alpha=2, activation="relu"))
    return src, conv


def check_finetune(device: str, work: Path, torchrun: bool = False) -> str:
    _, conv = _mlp_pair(work)
    out = work / ("ddp.safetensors" if torchrun else "ft.safetensors")
    fpewiden(
        "finetune",
        conv,
        "--data",
        DNF,
        "--out",
        out,
        "--epochs",
        "4",
        "--lr",
        "0.01",
        "--device",
        device,
        torchrun=torchrun,
    )
    nnz = same_masks(conv, out)
    log = json.loads(out.with_name(out.name + ".log.json").read_text())
    losses = [h["loss"] for h in log["history"] if h.get("loss") is not None]
    assert losses[-1] < losses[0], f"loss {losses[0]:.4f} → {losses[-1]:.4f}"
    return f"masks kept, {nnz} non-zeros, loss {losses[0]:.4f} → {losses[-1]:.4f}"


def check_hf(device: str, work: Path) -> str:
    """BERT: shared split with tied outgoing weights; Llama: calibrated conversion (calibration copies outgoing)."""
    import torch
    from helpers import sentences, tiny_bert, tiny_causal
    from safetensors.torch import load_file

    text = sentences(work / "text.txt", n=80)
    notes = []
    for name, build, flags in (
        ("bert", tiny_bert, ["--split", "shared", "--outgoing", "tied"]),
        ("llama", tiny_causal, ["--calibration", text]),
    ):
        src = build(work / name)
        conv = work / f"{name}-fpe"
        fpewiden("convert", src, "--out", conv, "--alpha", "2", *flags)
        out = work / f"{name}-ft"
        fpewiden(
            "finetune", conv, "--data", text, "--teacher", src, "--out", out, "--epochs", "1", "--device", device,
            "--batch-size", "8",
        )  # fmt: skip
        same_masks(conv, out)
        if "tied" in flags:
            tensors = load_file(str(out / "model.safetensors"))
            downs = [w for k, w in tensors.items() if k.endswith("output.dense.weight") and "attention" not in k]
            assert downs and all(torch.equal(w[:, 0::2], w[:, 1::2]) for w in downs), f"{name}: outgoing tie broken"
            notes.append(f"{name} (tied) masks and tie kept")
        else:
            notes.append(f"{name} (calibrated) masks kept")
    return ", ".join(notes)


STRUCTURES = {
    "fpe": ["--split", "random"],
    "tied": ["--split", "shared", "--outgoing", "tied"],
    "grouped": ["--split", "shared", "--outgoing", "grouped"],  # 1:2 outgoing: 2:4-compatible, torch's 2:4 path
}


def _bench_models(work: Path, dry: bool) -> tuple[list[Path], Path]:
    """An MLP (1024→4096→1024 on a GPU, 256→1024→256 dry), its conversions, and data for it."""
    import torch
    from safetensors.torch import save_file

    from fpewiden.model.chain_mlp import ChainMLP

    widths = [256, 1024, 256] if dry else [1024, 4096, 1024]
    src = work / "big.safetensors"
    save_file(
        ChainMLP.fresh(widths, "gelu", seed=0).tensors(),
        str(src),
        metadata={"fpewiden.version": "gpu-check", "fpewiden.activation": "gelu"},
    )
    g = torch.Generator().manual_seed(0)
    save_file(
        {"x": torch.randn(1024, widths[0], generator=g), "y": torch.randint(0, widths[-1], (1024,), generator=g)},
        str(work / "data.safetensors"),
    )
    models = [src]
    for tag, flags in STRUCTURES.items():
        dst = work / f"{tag}.safetensors"
        fpewiden("convert", src, "--out", dst, "--alpha", "2", "--activation", "gelu", *flags)
        models.append(dst)
    return models, work / "data.safetensors"


def _latencies(out: Path, engine: str) -> str:
    rows = json.loads(out.read_text())["benchmarks"]
    cells = []
    for name, r in zip(("dense", *STRUCTURES), rows, strict=True):
        lat = r["latency"][engine]
        cells.append(f"{name} " + "/".join(f"{lat[b]['median_ms']:.3f}" for b in ("1", "32", "1024")) + " ms")
        if engine == "torch" and "torch-2:4" in r["latency"]:
            cells[-1] += " (2:4 kernels ran)"
        elif engine == "torch" and r.get("torch_2_4"):
            cells[-1] += f" ({r['torch_2_4']})"
    return f"{engine} b1/b32/b1024: " + "; ".join(cells)


def check_bench(device: str, work: Path, dry: bool, engine: str = "torch") -> str:
    """Latency of dense, per-neuron FPE and the structures on the device (torch; ORT's CUDA provider needs
    onnxruntime-gpu, which a machine without it reports as the check's note, not as a failure)."""
    if engine == "ort" and device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return f"skipped: onnxruntime {onnxruntime.__version__} has no CUDA provider (needs onnxruntime-gpu)"
    models, data = _bench_models(work, dry)
    out = work / "bench.json"
    fpewiden(
        "bench", *models, "--data", data, "--engines", engine, "--device", device, "--batch-sizes", "1,32,1024",
        "--repeat", "20" if dry else "200", "--warmup", "5" if dry else "20", "--json", out,
    )  # fmt: skip
    return _latencies(out, engine)


def check_calibrate(device: str, dry: bool) -> str:
    import torch

    from fpewiden.convert.options import ConvertOptions
    from fpewiden.convert.transform import assignment, pair_seed
    from fpewiden.fpe.calibrated import CalibratedOptions, calibrate_pair
    from fpewiden.fpe.expand import Pair
    from fpewiden.fpe.pair_function import PairFunction, pair_output

    hidden, ffn = (256, 704) if dry else (4096, 11008)
    torch.manual_seed(0)
    gate, up = (torch.randn(ffn, hidden) / hidden**0.5 for _ in range(2))
    down = torch.randn(hidden, ffn) / ffn**0.5
    a = torch.randn(hidden, hidden) / hidden**0.5
    x_all = torch.randn(4096 + 1024, hidden) @ a
    x, held = x_all[:4096], x_all[4096:]
    pair = Pair([gate, up], [gate != 0, up != 0], [None, None], down, down != 0)
    fn = PairFunction(torch.nn.functional.silu, gated=True)
    notes = []
    for alpha in (1, 2):
        opts = ConvertOptions(alpha=alpha)
        split = lambda p, support, chosen, opts=opts: assignment(  # noqa: E731
            opts, p, support, torch.Generator().manual_seed(pair_seed(0, "pair"))
        )
        budget = pair.nnz() // 2
        copts = CalibratedOptions(alpha, 1.0 if alpha > 1 else 0.0, device=device)
        t = time.perf_counter()
        res = calibrate_pair(pair, x, fn, None, copts, split, budget)
        seconds = time.perf_counter() - t
        assert res.pair.nnz() == budget, f"α={alpha}: {res.pair.nnz()} non-zeros, budget {budget}"
        ref = pair_output(pair, held, fn, None)
        err = float((pair_output(res.pair, held, fn, None) - ref).norm() / ref.norm())
        notes.append(f"α={alpha} {seconds:.1f} s ({'/'.join(sorted(set(res.solvers)))}), held-out error {err:.4f}")
    return f"{hidden}→{ffn}→{hidden}: " + "; ".join(notes)


def check_packed(device: str, dry: bool) -> str:
    if dry:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates the kernels
    import statistics

    import torch
    from torch.nn import functional as F

    from fpewiden.packed import format as fmt
    from fpewiden.packed import triton_kernels as tk
    from fpewiden.packed.ops import FORMAT_CODES

    hidden, ffn = (64, 176) if dry else (4096, 11008)
    g = torch.Generator().manual_seed(0)
    dt = torch.float16
    cases = []
    for name, (r, c) in (("up 50%", (ffn, hidden)), ("down 50%", (hidden, ffn))):
        w = (torch.randn(r, c, generator=g) / c**0.5) * (torch.rand(r, c, generator=g) < 0.5)
        cases.append((name, fmt.pack_bitmask(w.to(dt).float(), dt), w.to(dt)))
    original = torch.randn(ffn, hidden, generator=g) / hidden**0.5
    child = torch.randint(2, (ffn, hidden), generator=g)
    wide = torch.zeros(ffn, 2, hidden).scatter_(1, child.unsqueeze(1), original.unsqueeze(1)).view(-1, hidden)
    cases.append(("FPE α=2 up (parent)", fmt.pack_parent(wide.to(dt).float(), 2, dt), original.to(dt)))
    half = cases[0][2].float()  # the up matrix at 50%, quantized: the packed int8 and int4 paths against fp16 cuBLAS
    cases.append(("up 50% int8", fmt.pack_bitmask(half, torch.int8), half.to(dt)))
    cases.append(("up dense int4", fmt.pack_dense(original, fmt.INT4), original.to(dt)))
    notes = []
    for name, pm, dense in cases:
        arrays = [t.to(device) if t is not None else None for t in (pm.values, pm.bits, pm.row_ptr)]
        scales = pm.scales.to(device) if pm.scales is not None else None
        dense = dense.to(device)
        ref_w = fmt.unpack(pm).to(device, torch.float32)
        ratios = []
        for n in (1, 17) if dry else (1, 4, 16, 32):
            x = torch.randn(n, pm.cols, generator=g).to(device)
            code = fmt.DTYPE_CODES[pm.dtype]
            args = (*arrays, None, pm.rows, pm.cols, FORMAT_CODES[pm.format], code, pm.alpha, pm.planes, pm.stride,
                    "triton", "", scales, pm.group)  # fmt: skip
            y = tk.linear(x, *args)
            want = x.double() @ ref_w.double().T
            err = float((y.double() - want).abs().max() / want.abs().max())
            assert err < 1e-5, f"{name} batch {n}: relative error {err:.2e}"
            if dry:
                continue
            xh = x.to(dt)
            fns = {
                "packed": lambda x=x, args=args: tk.linear(x, *args),
                "cublas": lambda xh=xh, d=dense: F.linear(xh, d),
            }
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(10):
                for f in fns.values():
                    f()
            for _ in range(100):
                for k, f in fns.items():
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    f()
                    b.record()
                    torch.cuda.synchronize()
                    times[k].append(a.elapsed_time(b))
            med = {k: statistics.median(v) for k, v in times.items()}
            ratios.append(f"b{n} {med['packed'] / med['cublas']:.2f}× ({med['cublas'] * 1e3:.0f} µs)")
        notes.append(f"{name}: " + (", ".join(ratios) if ratios else "exact"))
    return f"packed/cuBLAS fp16, {hidden}/{ffn}: " + "; ".join(notes) + _ort_cuda_note(device, dry, ffn, hidden)


def _ort_cuda_note(device: str, dry: bool, rows: int, cols: int) -> str:
    """ORT's CUDA provider on the dense matrix (fp16 MatMul), where onnxruntime-gpu is installed."""
    if dry:
        return ""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return "; ORT CUDA: onnxruntime not installed"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"; ORT CUDA: skipped (onnxruntime {ort.__version__} has no CUDA provider)"
    w = numpy_helper.from_array((np.random.randn(cols, rows) / cols**0.5).astype(np.float16), "w")
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", cols])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", rows])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x_info], [y_info], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
    out = []
    for n in (1, 32):
        x = np.random.randn(n, cols).astype(np.float16)
        for _ in range(10):
            sess.run(None, {"x": x})
        t = time.perf_counter()
        for _ in range(100):
            sess.run(None, {"x": x})
        out.append(f"b{n} {(time.perf_counter() - t) * 1e4:.0f} µs")
    return f"; ORT CUDA dense {rows}×{cols} (host round trip included): " + ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true", help="the CPU twin: same checks, device cpu, smaller bench")
    ap.add_argument("--only", default="", help="comma-separated check names (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU twin")
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {name}", flush=True)
    checks = {
        "main_job": lambda w: check_main_job(device, w),
        "finetune": lambda w: check_finetune(device, w),
        "torchrun": lambda w: check_finetune(device, w, torchrun=True),
        "hf": lambda w: check_hf(device, w),
        "bench": lambda w: check_bench(device, w, args.dry_run),
        "bench_ort": lambda w: check_bench(device, w, args.dry_run, engine="ort"),
        "calibrate": lambda w: check_calibrate(device, args.dry_run),
        "packed": lambda w: check_packed(device, args.dry_run),
    }
    only = [c for c in args.only.split(",") if c]
    results, failed = {}, 0
    for key, check in checks.items():
        if only and key not in only:
            continue
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            try:
                note, ok = check(Path(d)), True
            except Exception as e:  # one line per failed check; the rest still run
                note, ok = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}", False
                traceback.print_exc(file=sys.stderr)
        failed += not ok
        results[key] = {"ok": ok, "note": note, "seconds": round(time.perf_counter() - t, 1)}
        print(f"{'ok  ' if ok else 'FAIL'} {key:9s} {results[key]['seconds']:6.1f} s  {note}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "checks": results}, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
