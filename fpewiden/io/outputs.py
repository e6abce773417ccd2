"""What fpewiden may write where. Checked for every output of every command before any work starts:

- an output never equals, contains or lies inside an input (checkpoint, teacher, data, clauses, recipe, text);
- an existing output is replaced only by the same command from the same source (io/provenance.py: what it would
  write again), or with `--force`; anything else, fpewiden's other outputs included, is refused with a line
  that says what it is;
- the output's folder exists (missing folders are created) and really accepts a file (a probe is written and
  removed, so a read-only or full file system fails here, not after an hour of work);
- stages left by a killed earlier run to the same destination are removed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from fpewiden.errors import FpewidenError
from fpewiden.io import provenance as prov
from fpewiden.io.atomic import remove_stale
from fpewiden.io.provenance import Provenance


def written_by_fpewiden(path: Path) -> bool:
    """Whether `path` (which exists) is something fpewiden wrote, by any command from any source."""
    return prov.read(path) is not None


def _overlaps(out: Path, inp: Path) -> bool:
    return out == inp or inp in out.parents or out in inp.parents


def _probe(folder: Path, shown: Path) -> None:
    """Create and remove a file in `folder`: the only check that root, read-only mounts and full disks all obey."""
    try:
        fd, name = tempfile.mkstemp(prefix=".fpewiden-probe.", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise FpewidenError(f"cannot write {shown}: {e.strerror} ({folder})") from None


def check_outputs(
    outputs: list[Path],
    inputs: list[Path],
    force: bool = False,
    what: str = "--out",
    provenance: Provenance | None = None,
) -> None:
    """Refuse, before any work, every output that would destroy something the user owns (see module docstring).

    `outputs` are every path the command will write (sidecars and data files included); `inputs` every path it
    reads; `provenance` what this command records (None: nothing existing is replaced without --force). `what`
    names the option in messages when all outputs hang off one flag.
    """
    ins = [(p, p.resolve()) for p in inputs]
    seen: set[Path] = set()
    for out in outputs:
        target = out.resolve()
        for shown, src in ins:
            if _overlaps(target, src):
                relation = "is" if target == src else ("lies inside" if src in target.parents else "contains")
                raise FpewidenError(f"output {out} {relation} the input {shown}; choose another {what}")
        if force or not (out.is_symlink() or out.exists()):
            continue
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
            continue  # an empty folder holds nothing to lose
        found = prov.read(out)
        if found is None:
            kind = "folder" if out.is_dir() else "file"
            raise FpewidenError(f"{out} exists and is a {kind} fpewiden did not write; pass --force to replace it")
        if provenance is None or not provenance.may_replace(found):
            why = ""
            if provenance is not None and found.command == provenance.command:
                why = " from another source"
            raise FpewidenError(f"{out} exists and is {found.describe()}{why}; pass --force to replace it")
    for out in outputs:  # only once every output passed: missing folders are created (as mkdir -p would)
        target = out.resolve()
        parent = target.parent
        if parent not in seen:
            if not parent.is_dir():
                try:
                    parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise FpewidenError(
                        f"cannot write {out}: cannot create folder {out.parent} ({e.strerror})"
                    ) from None
            _probe(parent, out)
            seen.add(parent)
        remove_stale(target)
