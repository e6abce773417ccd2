"""What 2 MiB pages give the packed kernels: the same 50% bitmask matrix (Llama-7B FFN up, 11008×4096, fp32) read
from ordinary memory and from a huge-page copy (what fpewiden's torch loader does; the ONNX Runtime op asks for
the same in place with MADV_COLLAPSE), batch 1, interleaved rounds, medians (bench/packed.py's timer).

  python bench/huge_pages.py [--threads 1 --out bench/results/huge_pages]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packed import cpu_name, half, timed  # bench/packed.py

from fpewiden.packed import format as fmt
from fpewiden.packed import kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/huge_pages"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    isa = kernels.path()
    if isa == "torch":
        raise SystemExit(f"the packed kernels are {kernels.native_reason()}")
    rows, cols = 11008, 4096
    pm = fmt.pack_bitmask(half(rows, cols, 0))
    huge = [torch.ops.fpewiden.hugepage_copy(t) for t in (pm.values, pm.bits)]
    x = torch.randn(1, cols)

    def call(values, bits):
        return torch.ops.fpewiden.packed_linear(
            x, values, bits, pm.row_ptr, None, rows, cols, 0, 0, 1, 0, pm.stride, isa, "gemv"
        )

    res = timed({"ordinary pages": lambda: call(pm.values, pm.bits), "2 MiB pages": lambda: call(*huge)}, 3.0)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    ms = {k: v["median_ms"] for k, v in res.items()}
    lines = [
        "# Packed kernels on ordinary and on 2 MiB pages", "", f"`{command}`", "",
        f"CPU: {cpu_name()}; kernels: {isa}; {args.threads} thread(s); 11008×4096 at 50%, fp32, batch 1, decode "
        f"kernel; {res['2 MiB pages']['rounds']} interleaved rounds, medians.", "",
        "| memory | ms | ratio |", "|---|---|---|",
        *(f"| {k} | {v:.2f} | {v / ms['ordinary pages']:.2f}× |" for k, v in ms.items()),
    ]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"command": command, "timings": res}, indent=1) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
