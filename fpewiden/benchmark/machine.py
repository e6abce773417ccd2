"""The machine a measurement ran on, in the words a results file or a plot title needs."""

from __future__ import annotations

from pathlib import Path


def cpu_name() -> str:
    """/proc/cpuinfo's model name with its family and model numbers ("AMD EPYC (family 26, model 2)": a cloud VM's
    name alone does not tell a Zen 4 from a Zen 5, and the kernels' best settings differ); the platform's name
    elsewhere."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor's fields are enough
        if "model name" in fields:
            extra = [f"{k} {fields[k]}" for k in ("cpu family", "model") if fields.get(k)]
            return fields["model name"] + (f" ({', '.join(extra).replace('cpu family', 'family')})" if extra else "")
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
