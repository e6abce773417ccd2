"""The kernels' fuzz harnesses (csrc/fuzz/packed_fuzz.cc), built with clang's libFuzzer, AddressSanitizer and
UndefinedBehaviorSanitizer: `python -m fpewiden.packed.fuzz` (set-up --dev runs it; one line says why not where
there is no clang). Two targets: `raw` (a matrix exactly as a file could describe it -> the validator -> the
kernels) and `kernels` (consistent matrices of every format and value type, one corruption or none -> the
validator -> every ISA against the reference, exactly). The test suite runs both over the committed corpus
(tests/fuzz_corpus); bench/fuzz_kernels.py runs a campaign and writes the corpus and bench/results/fuzz.

Every ISA variant is compiled with its own target flags (clang ignores the `#pragma GCC target` gcc builds use);
the kernels and the harness get edge coverage only (comparison tracing in their loops dominated a run's time
under perf); the validator keeps comparison tracing, since its comparisons decide what runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from fpewiden.packed.built import BUILD, CSRC

TARGETS = ("raw", "kernels")
FUZZ = BUILD / "fuzz"
SANITIZE = ["-O2", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
EDGES = ["-fsanitize-coverage=inline-8bit-counters,pc-table"]  # coverage without comparison tracing
ISA_FLAGS = {
    "isa_avx2.cc": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mpopcnt"],
    "isa_avx2_q8.cc": ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mpopcnt"],
    "isa_avx512.cc": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi", "-mbmi2",
                      "-mpopcnt"],
    "isa_avx512_vnni.cc": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512vbmi",
                           "-mavx512vbmi2",
                           "-mbmi", "-mbmi2", "-mpopcnt"],
}  # fmt: skip


def clang() -> str:
    """clang++ with libFuzzer's runtime; RuntimeError saying what to install where there is none."""
    cxx = os.environ.get("FPEWIDEN_CLANG") or shutil.which("clang++")
    if cxx is None:
        raise RuntimeError("no clang++ (Debian: apt-get install clang libclang-rt-14-dev)")
    probe = subprocess.run([cxx, "-print-file-name=libclang_rt.fuzzer-x86_64.a"], capture_output=True, text=True)
    if not Path(probe.stdout.strip()).is_file():
        raise RuntimeError(f"{cxx} has no libFuzzer runtime (Debian: apt-get install libclang-rt-14-dev)")
    return cxx


def _objects() -> list[tuple[Path, list[str]]]:
    """(source, flags) of every object both targets link, the harness aside."""
    out = []
    for src in [CSRC / "dispatch.cc", *sorted(CSRC.glob("isa_*.cc"))]:
        out.append((src, [*EDGES, *ISA_FLAGS.get(src.name, [])]))
    out.append((CSRC / "validate.cc", ["-fsanitize=fuzzer-no-link"]))  # comparisons traced: it decides what runs
    return out


def source_hash() -> str:
    """The sources and this file (whose flags they are built with)."""
    h = hashlib.sha256()
    for p in [*sorted([*CSRC.glob("*.cc"), *CSRC.glob("*.h"), *CSRC.glob("fuzz/*.cc")]), Path(__file__)]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def binary(target: str) -> Path:
    return FUZZ / f"fuzz_{target}"


def built() -> bool:
    try:
        stamp = json.loads((FUZZ / "stamp.json").read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("sources") == source_hash() and all(binary(t).is_file() for t in TARGETS)


# the units that take longest under the sanitizers (the kernel template's instantiations), slowest first; the rest
# compile in seconds
SLOWEST_FIRST = ("isa_avx512.cc", "isa_avx512_vnni.cc", "isa_avx2.cc", "isa_portable.cc")


def _compile_all(jobs: list[list[str]]) -> None:
    """Every compile on a pool of one process per core, the slowest first (SLOWEST_FIRST): under the sanitizers
    the AVX-512 variant alone takes about as long as the other units together, so compiling in fixed pairs left a
    core idle for most of the build."""
    from concurrent.futures import ThreadPoolExecutor

    def rank(cmd: list[str]) -> int:
        name = Path(cmd[cmd.index("-c") + 1]).name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(run, sorted(jobs, key=rank)))
    for res in results:
        if res.returncode:
            errors = [line for line in res.stdout.splitlines() if "error" in line] or res.stdout.splitlines()[-1:]
            raise RuntimeError(errors[0][:240] if errors else "clang failed")


def build() -> dict[str, Path]:
    """Both targets, in _build/fuzz (rebuilt when a source changed)."""
    if built():
        return {t: binary(t) for t in TARGETS}
    cxx = clang()
    work = FUZZ / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = [cxx, *SANITIZE, "-std=c++17", "-Wno-unknown-pragmas"]
    jobs, objs = [], []
    for i, (src, flags) in enumerate(_objects()):
        obj = work / f"{i}-{src.stem}.o"
        objs.append(obj)
        jobs.append([*base, *flags, "-c", str(src), "-o", str(obj)])
    harness = CSRC / "fuzz" / "packed_fuzz.cc"
    for t in TARGETS:
        define = ["-DFPW_FUZZ_RAW"] if t == "raw" else []
        jobs.append([*base, *EDGES, *define, "-c", str(harness), "-o", str(work / f"{t}.o")])
    _compile_all(jobs)
    for t in TARGETS:
        link = [cxx, "-fsanitize=fuzzer,address,undefined", str(work / f"{t}.o"), *map(str, objs)]
        res = subprocess.run([*link, "-o", str(binary(t))], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError((res.stderr.strip().splitlines() or ["the link failed"])[-1][:240])
    (FUZZ / "stamp.json").write_text(json.dumps({"sources": source_hash()}) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return {t: binary(t) for t in TARGETS}


def unzip(corpus: Path, folder: Path) -> Path:
    """A committed corpus (TARGET.zip, OSS-Fuzz's seed-corpus form) unpacked into `folder`."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(corpus) as z:
        z.extractall(folder)
    return folder


def replay(target: str, corpus: Path, work: Path, runs: int) -> subprocess.CompletedProcess:
    """Every input of a committed corpus, then `runs` fresh executions (new inputs go to `work`, never to the
    corpus); a finding is a non-zero exit with the sanitizer's report on stderr."""
    inputs = unzip(corpus, work / "corpus")
    fresh = work / "new"
    fresh.mkdir(exist_ok=True)
    n = len(list(inputs.iterdir()))
    cmd = [str(binary(target)), f"-runs={n + runs}", f"-artifact_prefix={work}/", str(fresh), str(inputs)]
    return subprocess.run(cmd, capture_output=True, text=True)


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    try:
        paths = build()
    except (RuntimeError, OSError) as e:
        print(f"setup: fuzz harnesses not built ({e}); the fuzz test skips")
        return 0
    print(f"setup: fuzz harnesses built (ASan + UBSan): {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
