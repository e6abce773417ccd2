"""Packed files on disk against the files a user would otherwise ship: what `pack` writes, byte for byte.

The Llama-7B FFN pair 4096→11008→4096 as an fpewiden MLP checkpoint (random weights, fp32 safetensors):

  dense                the original file
  50%                  `convert --alpha 1 --budget 0.5` (each matrix's smallest half pruned), then `pack`
  FPE α=2              `convert --alpha 2` (the same non-zeros as the original, α× the neurons), then `pack`
  … --dtype int8       the same, packed with int8 values (`pack --dtype int8`); the reference for them is the
                       original packed with int8 values (the dense layout: a dynamic-int8 file's weight bytes)

  python bench/file_sizes.py [--out bench/results/file_sizes]

Issue 31's targets: 50% ≤ 0.56× the dense file, FPE α=2 ≤ 1.08×, 50% + int8 ≤ 0.70× the dense int8 file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.io.provenance import MD_MARKER, json_document
from fpewiden.packed.pack import pack_checkpoint

HIDDEN, FFN = 4096, 11008


def original(path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i, (a, b) in enumerate(((HIDDEN, FFN), (FFN, HIDDEN))):
        sd[f"{2 * i}.weight"] = torch.empty(b, a).uniform_(-1, 1, generator=g) / a**0.5
        sd[f"{2 * i}.bias"] = torch.zeros(b)
    save_file(sd, str(path))
    return path


def sizes(work: Path) -> list[dict]:
    src = original(work / "dense.safetensors")
    variants = {"50%": ConvertOptions(alpha=1, budget=Budget.parse("0.5")), "FPE α=2": ConvertOptions(alpha=2)}
    files = {"dense": src}
    for name, opts in variants.items():
        converted = work / f"{name.replace(' ', '').replace('%', '').replace('=', '')}.safetensors"
        convert(src, converted, opts)
        files[name] = converted
    rows = []
    dense_bytes = src.stat().st_size
    int8_bytes = None
    for dtype in (None, "int8"):
        for name, path in files.items():
            if name == "dense" and dtype is None:
                rows.append({"model": "dense", "values": "fp32", "bytes": dense_bytes, "vs": 1.0, "against": "dense"})
                continue
            out = work / f"{path.stem}.{dtype or 'fp32'}.packed.safetensors"
            pack_checkpoint(path, out, dtype)
            size = out.stat().st_size
            if name == "dense":
                int8_bytes = size
            base, against = (int8_bytes, "dense int8") if dtype else (dense_bytes, "dense")
            rows.append({"model": name, "values": dtype or "fp32", "bytes": size, "vs": size / base,
                         "against": against})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Packed files on disk (Llama-7B FFN pair 4096→11008→4096, fpewiden MLP checkpoint)",
        "",
        f"`{command}`",
        "",
        "File bytes as written (safetensors header included). Each int8 file is compared with the original packed "
        "with int8 values (dense layout, one scale per row).",
        "",
        "| model | values | MB | × reference | reference |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['values']} | {r['bytes'] / 1e6:.1f} | {r['vs']:.3f}× | {r['against']} |")
    return "\n".join(lines) + f"\n\n{MD_MARKER}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/file_sizes"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        rows = sizes(Path(d))
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(json_document({"command": command, "rows": rows}), indent=1))
    (args.out / "results.md").write_text(markdown(rows, command))
    print(markdown(rows, command))


if __name__ == "__main__":
    main()
