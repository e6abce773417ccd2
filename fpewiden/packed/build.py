"""Build the packed kernels (csrc/) against the installed torch: `python -m fpewiden.packed.build [-f] [-v]`
(-f rebuilds an up-to-date library, -v shows the compiler). It also builds the ONNX Runtime custom-op library
(csrc/ort/, the same kernels without torch) where ONNX Runtime's headers can be had (ort_headers.py).

scripts/setup.sh runs it after installing fpewiden, with the system C++ compiler (torch.utils.cpp_extension and
ninja; nothing is downloaded). Every ISA variant is compiled into one library and chosen at run time from the
CPU's features, so the library runs on any x86-64 machine. Where no compiler works, the build says so in one line
and fpewiden runs packed models on its pure-torch fallback. The library is tied to the torch it was built
against: a stamp records that torch's version, and a different torch makes fpewiden ask for a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
BUILD = Path(__file__).with_name("_build")
NAME = "fpewiden_kernels"
# -fopenmp: at::parallel_for is inline OpenMP code; without it the kernels run on one thread whatever torch's
# thread count (measured: 2 threads gave the same 7.0 ms as one at 11008x4096). The library then shares the
# libgomp torch already loaded (same soname), so there is one thread pool.
FLAGS = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-fopenmp"]


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cc"))


def source_hash() -> str:
    h = hashlib.sha256(" ".join(FLAGS).encode())
    for p in sorted([*CSRC.glob("*.cc"), *CSRC.glob("*.h")]):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def library() -> Path:
    return BUILD / f"{NAME}.so"


def stamp() -> dict | None:
    try:
        return json.loads((BUILD / "stamp.json").read_text())
    except (OSError, ValueError):
        return None


def _compile(work: Path, verbose: bool) -> None:
    """Compile into `work` (torch.utils.cpp_extension also loads the library into this process, so the build runs
    in a child process and the caller stays free to load the finished library once)."""
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=NAME,
        sources=[str(p) for p in sources()],
        extra_cflags=FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(work),
        is_python_module=False,
        verbose=verbose,
    )


def compiler() -> str:
    """The C++ compiler both libraries are built with: $CXX, else c++ or g++ on PATH. RuntimeError where there
    is none, so set-up says so in its one line (torch's extension builder would fail on a warning first)."""
    env = os.environ.get("CXX")
    cxx = env or shutil.which("c++") or shutil.which("g++")
    if cxx is None or shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler (CXX={env})" if env else "no C++ compiler")
    return cxx


def build(verbose: bool = False) -> Path:
    """Compile the library into _build/ (replacing an older one) and return its path; raises on failure."""
    import subprocess

    import torch

    compiler()
    work = BUILD / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cmd = [sys.executable, "-m", "fpewiden.packed.build", "--compile", str(work), *(["-v"] if verbose else [])]
    env = dict(os.environ)  # the environment's own bin (pip's ninja) before the system's
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    res = subprocess.run(cmd, capture_output=not verbose, text=True, env=env)
    if res.returncode:
        lines = f"{res.stdout or ''}\n{res.stderr or ''}".strip().splitlines()
        errors = [line for line in lines if ": error" in line or ": fatal error" in line]
        raise RuntimeError((errors or lines or [f"the compiler failed (exit {res.returncode})"])[0])
    tmp = library().with_suffix(f".so.{os.getpid()}.tmp")
    shutil.copy2(work / f"{NAME}.so", tmp)
    os.replace(tmp, library())  # a new file: processes that have the old one loaded keep running on it
    (BUILD / "stamp.json").write_text(json.dumps({"torch": torch.__version__, "sources": source_hash()}) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return library()


ORT_NAME = "fpewiden_ort"
ORT_FLAGS = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-maybe-uninitialized"]


def ort_sources() -> list[Path]:
    shared = [CSRC / "dispatch.cc", CSRC / "validate.cc", *sorted(CSRC.glob("isa_*.cc"))]
    return [CSRC / "ort" / "packed_matmul.cc", *shared]


def ort_library() -> Path:
    return BUILD / f"lib{ORT_NAME}.so"


def ort_source_hash() -> str:
    h = hashlib.sha256(" ".join(ORT_FLAGS).encode())
    for p in [*ort_sources(), *sorted(CSRC.glob("*.h"))]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def ort_stamp() -> dict | None:
    try:
        return json.loads((BUILD / "ort-stamp.json").read_text())
    except (OSError, ValueError):
        return None


def build_ort(verbose: bool = False) -> tuple[Path, dict]:
    """Compile the ONNX Runtime custom-op library with the system C++ compiler (one object per source, two at a
    time, then the link); raises RuntimeError saying why not."""
    import subprocess

    from fpewiden.packed import ort_headers

    cxx = compiler()  # before the headers: no download for a build that cannot run
    include, source = ort_headers.find(BUILD / "ort-include")
    work = BUILD / "ort-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    objs, jobs = [], []
    for i, src in enumerate(ort_sources()):
        obj = work / f"{i}-{src.stem}.o"
        objs.append(obj)
        jobs.append([cxx, *ORT_FLAGS, "-I", str(include), "-c", str(src), "-o", str(obj)])
    for k in range(0, len(jobs), 2):
        pair = jobs[k : k + 2]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in pair]
        for cmd, proc in zip(pair, procs, strict=True):
            out = proc.communicate()[0]
            if verbose:
                print(" ".join(cmd), out, sep="\n")
            if proc.returncode:
                errors = [line for line in out.splitlines() if "error" in line]
                raise RuntimeError((errors or [f"{cxx} failed on {Path(cmd[-3]).name}"])[0][:200])
    tmp = ort_library().with_suffix(f".so.{os.getpid()}.tmp")
    res = subprocess.run([cxx, "-shared", "-o", str(tmp), *map(str, objs)], capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError((res.stderr.strip().splitlines() or ["the link failed"])[0][:200])
    os.replace(tmp, ort_library())
    stamp = {"sources": ort_source_hash(), "api": ort_headers.api_version(include), "headers": source}
    (BUILD / "ort-stamp.json").write_text(json.dumps(stamp) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return ort_library(), stamp


def main_ort(force: bool, verbose: bool) -> None:
    """Set-up's second step: the ONNX Runtime library, or one line saying why `export --layout packed` is off."""
    built = ort_stamp() or {}
    if ort_library().is_file() and built.get("sources") == ort_source_hash() and not force:
        print(f"setup: ONNX Runtime packed op up to date: {ort_library()}")
        return
    try:
        path, stamp = build_ort(verbose)
    except Exception as e:  # no headers, no network, no compiler: everything else still runs
        reason = str(e).strip().splitlines()[-1][:240] if str(e).strip() else type(e).__name__
        print(f"setup: ONNX Runtime packed op not built ({reason}); export --layout packed is unavailable")
        return
    print(f"setup: ONNX Runtime packed op built (API {stamp['api']}, headers: {stamp['headers']}): {path}")


def main() -> int:
    if "--compile" in sys.argv:
        _compile(Path(sys.argv[sys.argv.index("--compile") + 1]), "-v" in sys.argv)
        return 0
    import torch

    built = stamp() or {}
    force, verbose = "-f" in sys.argv, "-v" in sys.argv
    if library().is_file() and built == {"torch": torch.__version__, "sources": source_hash()} and not force:
        print(f"setup: packed kernels up to date: {library()}")
    else:
        try:
            path = build(verbose=verbose)
        except Exception as e:  # no compiler, no ninja, headers missing: the fallback runs, and we say so once
            reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            print(f"setup: packed kernels not built ({reason}); packed models run on the pure-torch fallback")
        else:
            from fpewiden.packed import kernels

            print(f"setup: packed kernels built ({kernels.path()} on this CPU): {path}")
    main_ort(force, verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
