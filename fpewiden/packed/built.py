"""What the packed kernels' builds produce and whether it is current: the libraries' paths under _build/, the
flags they are compiled with, and the stamps that tie each library to its sources (and the torch library to the
torch it was built against). build.py compiles; kernels.py, ort.py, crossover.py and fuzz.py read only this, so
nothing that loads a library imports the compiler driver.
"""

from __future__ import annotations

import hashlib
import json
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
