"""Convert speed and memory against the I/O floor, same run.

Builds a synthetic Llama-shaped sharded checkpoint (random bf16 gate/up/down), then in separate processes:
  floor:   read every tensor and write the same checkpoint unchanged (fpewiden's own streaming reader/writer),
  floor_output_sized: the same, but writing α copies of every tensor: the bytes a conversion must write,
  plain copy: `shutil.copytree` of the folder plus a file of the extra bytes an α output holds, synced (what
    the disk and page cache allow without any tensor work),
  convert: `fpewiden convert --alpha 2` (budget same); with `--packed`, `convert --packed` (the dense α× output
    is staged, then packed), and the plain copy then writes no extra bytes (the packed output is about the
    input's size).
Reports seconds, parameters per second and each process's peak RSS (and net of the import baseline), plus the
ratios to every floor. Runs alternate `--rounds` times; medians are reported.

  python bench/convert_speed.py [--layers 8 --hidden 4096 --intermediate 11008 --layers-per-shard 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Peak RSS is read from /proc/self/status VmHWM: unlike ru_maxrss, it is not inherited across fork/exec.
HWM = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"

FLOOR = r"""
import sys, json, time
from pathlib import Path
from fpewiden.io.checkpoint import open_checkpoint
from fpewiden.io.safetensors_stream import StreamingWriter
src, dst, copies = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
ck = open_checkpoint(src)
dst.mkdir()
files = {}
for n in ck.shapes:
    for c in range(copies):
        files.setdefault(ck.file_of[n], {})[f"{n}.{c}"] = (ck.dtypes[n], ck.shapes[n])
for f, layout in files.items():
    w = StreamingWriter(dst / f, layout, {"format": "pt"})
    for n in {k.rsplit(".", 1)[0] for k in layout}:
        t_ = ck.get(n)
        for c in range(copies):
            w.write(f"{n}.{c}", t_)
    w.close()
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": HWM}))
""".replace("HWM", HWM)

CONVERT = r"""
import sys, json, time
from pathlib import Path
from fpewiden.convert import convert, ConvertOptions
t = time.perf_counter()
opts = ConvertOptions(alpha=int(sys.argv[3]), split=sys.argv[4])
convert(Path(sys.argv[1]), Path(sys.argv[2]), opts, packed=sys.argv[5] == "packed")
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mb": HWM}))
""".replace("HWM", HWM)

BASELINE = r"""
import json, torch, fpewiden.convert
print(json.dumps({"peak_rss_mb": HWM}))
""".replace("HWM", HWM)

BUILD = r"""
import sys
sys.path.insert(0, "bench")
from pathlib import Path
from convert_speed import build
print(build(Path(sys.argv[1]), *map(int, sys.argv[2:])))
"""


def build(root: Path, layers: int, hidden: int, inter: int, per_shard: int) -> int:
    import torch

    from fpewiden.io.safetensors_stream import StreamingWriter

    root.mkdir()
    n_shards = (layers + per_shard - 1) // per_shard
    weight_map = {}
    params = 0
    g = torch.Generator().manual_seed(0)
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        layout = {}
        for i in range(s * per_shard, min(layers, (s + 1) * per_shard)):
            shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
            for proj, shape in shapes.items():
                layout[f"model.layers.{i}.mlp.{proj}.weight"] = ("BF16", shape)
        w = StreamingWriter(root / fname, layout, {"format": "pt"})
        for name, (_, shape) in layout.items():
            w.write(name, (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))
            weight_map[name] = fname
            params += shape[0] * shape[1]
        w.close()
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": inter,
                "num_hidden_layers": layers,
                "hidden_act": "silu",
                "num_attention_heads": 32,
                "vocab_size": 32000,
            }
        )
    )
    return params


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_copy(src: Path, dst: Path, extra: int) -> float:
    """Copy the folder, write `extra` more bytes, sync: the floor of any conversion that writes an α output."""
    import os
    import time

    t = time.perf_counter()
    shutil.copytree(src, dst)
    chunk = b"\0" * (64 << 20)
    with open(dst / "extra.bin", "wb") as f:
        left = extra
        while left:
            left -= f.write(chunk[: min(left, len(chunk))])
        f.flush()
        os.fsync(f.fileno())
    os.sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--layers-per-shard", type=int, default=2)
    ap.add_argument("--alpha", type=int, default=2)
    ap.add_argument("--split", default="random")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--packed", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("bench/results/convert_speed.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fpewiden-bench-"))
    try:
        built = subprocess.run(
            [
                sys.executable,
                "-c",
                BUILD,
                str(work / "src"),
                str(args.layers),
                str(args.hidden),
                str(args.intermediate),
                str(args.layers_per_shard),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        params = int(built.stdout.split()[-1])
        pair_mb = 3 * args.hidden * args.intermediate * 2 / 2**20
        base = run(BASELINE)
        runs: dict[str, list[dict]] = {"floor": [], "floor_output_sized": [], "plain_copy": [], "convert": []}
        for _ in range(args.rounds):
            runs["floor"].append(run(FLOOR, str(work / "src"), str(work / "floor"), "1"))
            shutil.rmtree(work / "floor")
            runs["floor_output_sized"].append(run(FLOOR, str(work / "src"), str(work / "floor"), str(args.alpha)))
            shutil.rmtree(work / "floor")
            extra = 0 if args.packed else params * 2 * (args.alpha - 1)
            runs["plain_copy"].append({"seconds": plain_copy(work / "src", work / "copy", extra)})
            shutil.rmtree(work / "copy")
            mode = "packed" if args.packed else "dense"
            dst = str(work / "dst")
            runs["convert"].append(run(CONVERT, str(work / "src"), dst, str(args.alpha), args.split, mode))
            shutil.rmtree(work / "dst")

        def median(key: str, field: str) -> float:
            return statistics.median(r[field] for r in runs[key])

        conv_s, conv_rss = median("convert", "seconds"), max(r["peak_rss_mb"] for r in runs["convert"])
        result = {
            "command": "python " + " ".join(sys.argv),
            "shape": f"{args.layers} layers x gate/up {args.intermediate}x{args.hidden} + down, bf16",
            "packed": args.packed,
            "params": params,
            "input_gb": params * 2 / 1e9,
            "rounds": args.rounds,
            "largest_pair_mb_bf16_in": pair_mb,
            "largest_pair_mb_bf16_out": pair_mb * args.alpha,
            "import_baseline_rss_mb": base["peak_rss_mb"],
            "seconds": {k: median(k, "seconds") for k in runs},
            "runs": runs,
            "convert_params_per_s": params / conv_s,
            "time_ratio_convert_over_floor": conv_s / median("floor", "seconds"),
            "time_ratio_convert_over_output_sized_floor": conv_s / median("floor_output_sized", "seconds"),
            "time_ratio_convert_over_plain_copy": conv_s / median("plain_copy", "seconds"),
            "convert_peak_rss_mb": conv_rss,
            "rss_net_of_import_mb": conv_rss - base["peak_rss_mb"],
            "rss_net_ratio_over_largest_pair_out": (conv_rss - base["peak_rss_mb"]) / (pair_mb * args.alpha),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
