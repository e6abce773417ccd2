"""Peak memory of a calibrated conversion of a whole checkpoint: block by block (the default) against the whole
model in memory (`Calibration.whole_model`, the reference path).

An 8-layer Llama-shaped model (hidden 2048, FFN 5632, 32 heads, 4 KV heads; random weights, bf16 on disk, see
llama_shaped.py) is converted with `--alpha 1 --budget 0.5 --calibration` on TREC training questions (the
default calibration set: sentences up to 16k tokens). Each conversion runs in its own process; peak RSS is the
process's VmHWM, shown net of a process that imported the same libraries and read the tokenizer. The target is
a peak of at most 3× one decoder block (fp32, as converted) plus the calibration activations (the hidden states
of every token at the model's width and at the FFN's, fp32). `block-by-block-dynamic-malloc` is the default path
with glibc's dynamic mmap threshold left as it is (fpewiden/memory.py not applied).

Two baselines, both reported: the process after its imports (the strict one), and a warmed-up process that has
also run a calibrated conversion of a one-layer model at hidden 256 on 64 sentences, with the solver the large
pairs get (`cg`; the exact solver's batched working set, up to 256 MiB, is no fixed cost). The second holds what
any conversion costs whatever the model (modules imported on first use, library code paged in, the BLAS
library's and the allocator's own buffers), so the peak net of it is what the model itself adds; the warm-up's own
tensors are a few MB.

  python bench/calibration_memory.py [--layers 8 --hidden 2048 --ffn 5632 --out bench/results/calibration_memory]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

CHILD = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[5]))
from fpewiden.convert import Budget, Calibration, ConvertOptions, convert
import transformers
src, dst, data, mode = sys.argv[1:5]
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
transformers.AutoTokenizer.from_pretrained(src)
if mode == "baseline":
    print(json.dumps({"mode": mode, "peak_bytes": hwm()}))
    raise SystemExit
if mode == "warm-baseline":  # sys.argv[6]: the one-layer model
    cal = Calibration(data=data, samples=64, solver="cg")
    convert(__import__("pathlib").Path(sys.argv[6]), __import__("pathlib").Path(dst),
            ConvertOptions(alpha=1, budget=Budget.parse("0.5"), calibration=cal))
    print(json.dumps({"mode": mode, "peak_bytes": hwm()}))
    raise SystemExit
if mode != "block-by-block-dynamic-malloc":  # as `fpewiden convert --calibration` does (fpewiden/memory.py)
    from fpewiden.memory import return_freed_memory
    return_freed_memory()
t = time.perf_counter()
cal = Calibration(data=data, solver="auto", whole_model=mode == "whole-model")
report = convert(__import__("pathlib").Path(src), __import__("pathlib").Path(dst),
                 ConvertOptions(alpha=1, budget=Budget.parse("0.5"), calibration=cal))
seconds = time.perf_counter() - t
meta = report["metadata"].get("calibration")
meta = json.loads(meta) if isinstance(meta, str) else meta
print(json.dumps({"mode": mode, "seconds": seconds, "peak_bytes": hwm(), "tokens": meta["tokens"]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--threads", type=int, default=2)
    modes = "which paths to measure (also block-by-block-dynamic-malloc: without fpewiden/memory.py)"
    ap.add_argument("--modes", default="block-by-block,whole-model", help=modes)
    ap.add_argument("--out", type=Path, default=Path("bench/results/calibration_memory"))
    args = ap.parse_args()
    from llama_shaped import build

    from fpewiden.data.embeddings import task_sentences

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = build(Path(tmp) / "llama", args.hidden, args.ffn, args.layers)
        tiny = build(Path(tmp) / "tiny", 256, 704, 1, heads=8, kv_heads=4)
        data = Path(tmp) / "trec.txt"
        data.write_text("\n".join(task_sentences("trec6", "train")[0]) + "\n")
        rows = []
        for mode in ["baseline", "warm-baseline", *args.modes.split(",")]:
            cmd = [sys.executable, "-c", CHILD, str(src), str(Path(tmp) / mode), str(data), mode, str(args.threads)]
            cmd += [str(tiny)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    kv = args.hidden // 32 * 4
    block = 4 * (2 * args.hidden * args.hidden + 2 * args.hidden * kv + 3 * args.hidden * args.ffn + 2 * args.hidden)
    tokens = rows[2]["tokens"] or 0
    acts = 4 * tokens * (args.hidden + args.ffn)
    base, warm = rows[0]["peak_bytes"], rows[1]["peak_bytes"]
    target = 3 * block + acts
    mb = 1 / 2**20
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        "# Peak memory of a calibrated conversion: block by block against the whole model",
        "",
        f"`{command}`",
        "",
        f"Llama-shaped, {args.layers} layers, hidden {args.hidden}, FFN {args.ffn}, 32 heads / 4 KV heads, random "
        f"weights stored in bf16; `--alpha 1 --budget 0.5 --calibration` on TREC training questions ({tokens:,} "
        f"tokens), solver auto, {args.threads} threads, each run its own process. One block in fp32: "
        f"{block * mb:.0f} MB; the calibration activations (fp32 at width {args.hidden} and {args.ffn}): "
        f"{acts * mb:.0f} MB; target 3 × block + activations = {target * mb:.0f} MB. Peak RSS (VmHWM) is shown "
        f"net of a process that imported the same libraries ({base * mb:.0f} MB) and net of a warmed-up one that "
        f"also converted a one-layer model at hidden 256 ({warm * mb:.0f} MB; see the script's docstring).",
        "",
        "| path | seconds | peak RSS net of imports, MB | within target | net of the warmed-up process, MB | "
        "within target |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows[2:]:
        net, net_warm = r["peak_bytes"] - base, r["peak_bytes"] - warm
        ok, ok_warm = ("yes" if n <= target else "no" for n in (net, net_warm))
        lines.append(
            f"| {r['mode']} | {r['seconds']:.0f} | {net * mb:.0f} ({net / target:.2f}× target) | {ok} | "
            f"{net_warm * mb:.0f} ({net_warm / target:.2f}× target) | {ok_warm} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    payload = {"command": command, "block_bytes": block, "activation_bytes": acts, "rows": rows}
    (args.out / "results.json").write_text(json.dumps(payload, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
