"""The machine a measurement ran on, in the words a results file or a plot title needs."""

from __future__ import annotations

from pathlib import Path


def cpu_name() -> str:
    """/proc/cpuinfo's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor"); the platform's name elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def describe(threads: int | list[int] | None = None) -> str:
    """`AMD EPYC, 1 thread`: for titles and notes."""
    if threads is None:
        return cpu_name()
    ts = sorted(set(threads)) if isinstance(threads, list) else [threads]
    n = ", ".join(map(str, ts))
    return f"{cpu_name()}, {n} thread{'' if ts == [1] else 's'}"
