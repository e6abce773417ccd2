"""Where convert spends its time: py-spy samples of `fpewiden convert` on a Llama-shaped bf16 checkpoint.

Builds the checkpoint bench/convert_speed.py builds, records convert (α=2, budget same) with py-spy in raw
(collapsed stack) format, and writes the functions with the largest inclusive and self shares of the samples,
with the command, to `--out` (Markdown) next to the raw stacks.

  python bench/convert_profile.py [--layers 2 --rate 200 --out bench/results/convert_profile]
"""

from __future__ import annotations

import argparse
import collections
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_speed import CONVERT, build

from fpewiden.io.provenance import MD_MARKER


def frames(line: str) -> tuple[list[str], int]:
    """py-spy raw format: `frame;frame;... count`, root first; a frame is `function (file:line)`."""
    stack, _, n = line.rpartition(" ")
    out = []
    for f in stack.split(";"):
        name, _, where = f.partition(" (")
        path = where.rsplit(":", 1)[0]
        short = path.split("site-packages/")[-1].split("/work/main/")[-1]
        out.append(f"{name} ({short})")
    return out, int(n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, default=Path("bench/results/convert_profile"))
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "src", Path(d) / "dst"
        params = build(src, args.layers, 4096, 11008, 2)
        raw = args.out / "stacks.txt"
        cmd = [spy, "record", "--format", "raw", "--rate", str(args.rate), "--nonblocking", "-o", str(raw), "--"]
        subprocess.run([*cmd, sys.executable, "-c", CONVERT, str(src), str(dst), "2", "random"], check=True,
                       capture_output=True)  # fmt: skip
    total, inclusive, self_ = 0, collections.Counter(), collections.Counter()
    for line in raw.read_text().splitlines():
        if not line.strip():
            continue
        stack, n = frames(line)
        total += n
        for f in set(stack):
            inclusive[f] += n
        self_[stack[-1]] += n
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        f"# Where convert spends its time ({args.layers} Llama-shaped layers, {params / 1e6:.0f} M bf16 parameters, "
        "α=2, budget same)",
        "",
        f"`{command}` — py-spy {args.rate} Hz, {total} samples, 2 CPU cores.",
        "",
        "| function | inclusive | self |",
        "|---|---|---|",
    ]
    ours = [f for f, _ in inclusive.most_common() if "fpewiden/" in f or f.startswith("<module>")]
    for f in ours[: args.top]:
        lines.append(f"| `{f}` | {inclusive[f] / total:.1%} | {self_[f] / total:.1%} |")
    lines += ["", "Largest self shares, any code:", "", "| function | self |", "|---|---|"]
    for f, n in self_.most_common(12):
        lines.append(f"| `{f}` | {n / total:.1%} |")
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
