"""A fuzz campaign over the packed kernels' C entry points (fpewiden/packed/fuzz.py builds the harnesses with
libFuzzer, AddressSanitizer and UndefinedBehaviorSanitizer): both targets at once, one core each, seeded from real
packed matrices (an MLP converted by fpewiden — 50% pruning, FPE α=2/3/4 — and packed in every value type), then
the corpus minimised (libFuzzer -merge=1) into tests/fuzz_corpus/TARGET.zip (OSS-Fuzz's seed-corpus form: one
file per target), which the test suite replays and the next campaign starts from.

  python bench/fuzz_kernels.py [--runs 10000000] [--out bench/results/fuzz] [--corpus tests/fuzz_corpus]

Writes OUT/results.md and results.json: executions, seconds, coverage (libFuzzer's cov/ft), corpus sizes, findings
(crash, leak, timeout or out-of-memory artifacts, kept in OUT/artifacts), the CPU and the ISAs fuzzed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from fpewiden.benchmark.machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fuzz_corpus"


def real_matrices(work: Path) -> list:
    """Packed matrices from fpewiden's own pipeline: a small MLP converted (50% pruning; FPE α=2, 3, 4 with tied
    outgoing weights, so the incoming matrices take the parent layout) and packed in fp32, bf16 and fp16."""
    from safetensors.torch import save_file

    from fpewiden.convert import Budget, ConvertOptions, convert
    from fpewiden.packed.pack import pack_checkpoint
    from fpewiden.packed.reader import read_packed

    g = torch.Generator().manual_seed(0)
    widths = (140, 40, 24)
    sd = {}
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        sd[f"{2 * i}.weight"] = torch.randn(b, a, generator=g)
        sd[f"{2 * i}.bias"] = torch.randn(b, generator=g)
    src = work / "mlp.safetensors"
    save_file(sd, str(src))
    out = []
    for alpha in (1, 2, 3, 4):
        conv = work / f"a{alpha}.safetensors"
        opts = (
            ConvertOptions(alpha=1, budget=Budget.parse("0.5"))
            if alpha == 1
            else ConvertOptions(alpha=alpha, outgoing="tied")
        )
        convert(src, conv, opts)
        for dtype in ("fp32", "bf16", "fp16", "int8", "int4"):
            packed = work / f"a{alpha}-{dtype}.safetensors"
            pack_checkpoint(conv, packed, dtype=dtype)
            pc = read_packed(packed)
            out += [pc.packed(n) for n in pc.entries]
    return out


def first_units(pm, small: bool):
    """The first 8 units (rows, or parents with their children) and 140 columns of `pm`, packed again in its
    format and value type; `small`: values rounded to the integers -8..8 the kernels target computes with."""
    from fpewiden.packed import format as fmt

    alpha = pm.alpha if pm.format == "parent" else 1
    w = fmt.unpack(pm).float()[: 8 * alpha, :140]
    if small:
        kept = w != 0
        w = (w * 2).round().clamp(-8, 8)
        w[kept & (w == 0)] = 1  # kept weights stay non-zero
    if pm.format == "dense":
        return fmt.pack_dense(w, pm.values.dtype)
    sub = fmt.pack_parent(w, alpha, pm.values.dtype) if alpha > 1 else fmt.pack_bitmask(w, pm.values.dtype)
    assert sub is not None
    return sub


def raw_seed(pm) -> bytes:
    """The raw target's layout (csrc/fuzz/packed_fuzz.cc), of the first units of `pm`."""
    from fpewiden.packed.format import DTYPE_CODES, FORMATS

    pm = first_units(pm, small=False)
    values = pm.values.view(torch.uint8).numpy().tobytes()
    bits = pm.bits.numpy().tobytes()
    offsets = b"" if pm.row_ptr is None else pm.row_ptr.numpy().tobytes()
    scales = b"" if pm.scales is None else pm.scales.numpy().tobytes()
    fields = (FORMATS.index(pm.format), DTYPE_CODES[pm.values.dtype], pm.rows, pm.cols, pm.stride)
    group = {0: 0, 16: 25, 32: 5, 64: 27}[pm.group]  # the harness's group byte: odd g is 1 << (g % 21)
    sizes = (pm.alpha, pm.planes, 3, group, len(values), len(bits), len(offsets) // 8)
    head = struct.pack("<BBHHHbbBBHHH", *fields, *sizes)
    return head + values + bits + offsets + struct.pack("<H", len(scales) // 4) + scales


def kernels_seed(pm, lanes: int) -> bytes:
    """The kernels target's layout of the first units of `pm` (its sparsity; values as the harness makes them)."""
    sub = first_units(pm, small=True)
    alpha = sub.alpha if sub.format == "parent" else 1
    dtype = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3, torch.uint8: 3}[sub.values.dtype]
    kind = (1 if alpha > 1 else 0) | dtype << 1 | (max(alpha, 2) - 2) << 3 | (32 if sub.format == "dense" else 0)
    kind |= 128 if sub.values.dtype == torch.uint8 else 0  # int4
    head = bytes([kind, sub.rows // alpha - 1, sub.cols - 1, 3, lanes, 0, 0])
    if sub.values.dtype == torch.uint8:  # int4: its values as bytes, taken % 8
        from fpewiden.packed.format import nibbles

        vals = nibbles(sub.values, sub.nnz).numpy().tobytes()
    else:
        vals = sub.values[: sub.nnz].float().to(torch.int8).numpy().tobytes()  # int8: its own bytes, taken % 9
    return head + sub.bits.numpy().tobytes() + vals


def seeds(folder: Path) -> dict[str, Path]:
    out = {t: folder / f"seeds-{t}" for t in ("raw", "kernels")}
    for d in out.values():
        d.mkdir(parents=True)
    for i, pm in enumerate(real_matrices(folder)):
        (out["raw"] / f"real-{i:03d}").write_bytes(raw_seed(pm))
        for lanes in (0, 23, 250):  # 9, 32 and 108 lanes of the token-batch kernel
            (out["kernels"] / f"real-{i:03d}-{lanes}").write_bytes(kernels_seed(pm, lanes))
    return out


def stats(log: str) -> dict:
    """Executions, seconds and coverage from libFuzzer's log."""
    done = re.findall(r"Done (\d+) runs in (\d+) second", log)
    cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    return {
        "executions": int(done[-1][0]) if done else None,
        "seconds": int(done[-1][1]) if done else None,
        "cov": int(cov[-1][0]) if cov else None,
        "ft": int(cov[-1][1]) if cov else None,
    }


def main() -> int:
    from fpewiden.packed import fuzz
    from fpewiden.packed.fuzz import TARGETS, binary

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000_000, help="executions per target")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz")
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="where TARGET.zip is read from and written")
    args = ap.parse_args()
    fuzz.build()
    args.out.mkdir(parents=True, exist_ok=True)
    artifacts = args.out / "artifacts"
    shutil.rmtree(artifacts, ignore_errors=True)
    artifacts.mkdir()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seed_dirs = seeds(work)

        def committed(t: str) -> list[str]:  # the corpus the last campaign left, unpacked once
            z, folder = args.corpus / f"{t}.zip", work / f"committed-{t}"
            if z.is_file() and not folder.is_dir():
                fuzz.unzip(z, folder)
            return [str(folder)] if folder.is_dir() else []

        procs, logs, t0 = {}, {}, time.time()
        for t in TARGETS:
            live = work / f"corpus-{t}"
            live.mkdir()
            logs[t] = work / f"{t}.log"
            cmd = [str(binary(t)), f"-runs={args.runs}", f"-artifact_prefix={artifacts}/{t}-", "-print_final_stats=1",
                   # entropic scheduling's feature bookkeeping took half of each run at 35k features (measured
                   # 4.1k against 8.3k runs/s on the kernels target); plain scheduling makes the 10M runs in time
                   *(["-entropic=0"] if t == "kernels" else []),
                   str(live), str(seed_dirs[t]), *committed(t)]  # fmt: skip
            procs[t] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(logs[t], "w"))
        codes = {t: p.wait() for t, p in procs.items()}
        rows = {}
        for t in TARGETS:
            log = logs[t].read_text(errors="replace")
            (args.out / f"{t}.log.tail").write_text("\n".join(log.splitlines()[-40:]) + "\n")
            fresh = work / f"merged-{t}"
            fresh.mkdir()
            subprocess.run([str(binary(t)), "-merge=1", str(fresh), str(work / f"corpus-{t}"), str(seed_dirs[t]),
                            *committed(t)], capture_output=True)  # fmt: skip
            args.corpus.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(args.corpus / f"{t}.zip", "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(fresh.iterdir()):
                    z.write(p, p.name)
            isas = re.findall(r"fpewiden fuzz: ISAs (.*)", log)
            found = sorted(p.name for p in artifacts.glob(f"{t}-*"))
            rows[t] = stats(log) | {
                "exit": codes[t],
                "findings": found,
                "corpus": len(list(fresh.iterdir())),
                "seeds": len(list(seed_dirs[t].iterdir())),
                "isas": isas[0] if isas else "?",
            }
    cpu = cpu_name()
    clang = subprocess.run([fuzz.clang(), "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    isas = sorted({r["isas"] for r in rows.values()})
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)  # every flag, --out included
    doc = {"command": command, "cpu": cpu, "isas": isas, "clang": clang, "wall_s": round(time.time() - t0),
           "targets": rows}  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Fuzzing the packed kernels (libFuzzer, ASan + UBSan)", "", f"`{command}`", "",
        f"CPU: {cpu}; ISAs fuzzed: {', '.join(isas)} (the variants this CPU runs; the harness runs every one on "
        f"each input); {clang}; both targets at once, one core each, {doc['wall_s']} s of wall time.", "",
        "| target | executions | seconds | cov | ft | seeds | corpus (merged) | findings | exit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for t, r in rows.items():
        found = ", ".join(r["findings"]) or "none"
        lines.append(f"| {t} | {r['executions']:,} | {r['seconds']} | {r['cov']} | {r['ft']} | {r['seeds']} | "
                     f"{r['corpus']} | {found} | {r['exit']} |")  # fmt: skip
    lines += ["", "`raw`: a matrix exactly as a file could describe it, through fpw_validate, then every kernel. "
              "`kernels`: consistent matrices with one corruption or none; what the validator passes must equal the "
              "reference exactly on every ISA, and an uncorrupted matrix it refuses is a finding. The merged corpus "
              "is tests/fuzz_corpus/TARGET.zip, which tests/test_fuzz.py replays."]  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(shlex.join(["wrote", str(args.out / "results.md")]))
    return 0 if all(r["exit"] == 0 and not r["findings"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
