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

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from fpewiden.packed import built
from fpewiden.packed.built import (
    FLAGS,
    NAME,
    ORT_FLAGS,
    library,
    ort_library,
    ort_source_hash,
    ort_sources,
    ort_stamp,
    source_hash,
    sources,
    stamp,
)


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
    work = built.BUILD / "work"
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
    (built.BUILD / "stamp.json").write_text(json.dumps({"torch": torch.__version__, "sources": source_hash()}) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return library()


def build_ort(verbose: bool = False) -> tuple[Path, dict]:
    """Compile the ONNX Runtime custom-op library with the system C++ compiler (one object per source, two at a
    time, then the link); raises RuntimeError saying why not."""
    import subprocess

    from fpewiden.packed import ort_headers

    cxx = compiler()  # before the headers: no download for a build that cannot run
    include, source = ort_headers.find(built.BUILD / "ort-include")
    work = built.BUILD / "ort-work"
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
    (built.BUILD / "ort-stamp.json").write_text(json.dumps(stamp) + "\n")
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fpewiden.packed.build", description=__doc__.splitlines()[0])
    ap.add_argument("-f", "--force", action="store_true", help="rebuild an up-to-date library")
    ap.add_argument("-v", "--verbose", action="store_true", help="show the compiler")
    ap.add_argument("--compile", type=Path, help=argparse.SUPPRESS)  # the build's own child process
    args = ap.parse_args(argv)
    if args.compile is not None:
        _compile(args.compile, args.verbose)
        return 0
    import torch

    built = stamp() or {}
    if library().is_file() and built == {"torch": torch.__version__, "sources": source_hash()} and not args.force:
        print(f"setup: packed kernels up to date: {library()}")
    else:
        try:
            path = build(verbose=args.verbose)
        except Exception as e:  # no compiler, no ninja, headers missing: the fallback runs, and we say so once
            reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            print(f"setup: packed kernels not built ({reason}); packed models run on the pure-torch fallback")
        else:
            from fpewiden.packed import kernels

            print(f"setup: packed kernels built ({kernels.path()} on this CPU): {path}")
    main_ort(args.force, args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
