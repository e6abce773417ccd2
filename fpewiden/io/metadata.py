"""fpewiden's metadata, typed: one reader and one writer for what convert, finetune and run record.

On disk it is safetensors' string-to-string `__metadata__` (the format allows nothing else), every key prefixed
`fpewiden.`: numbers as decimal text, lists and dicts as JSON. Everything else reads and writes `FpeMetadata`,
so no caller parses `int(meta["alpha"])` by hand. Keys this version does not know are kept verbatim in `extra`
and written back, so a newer file passes through an older fpewiden unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

PREFIX = "fpewiden."

_INT = ("alpha", "seed", "budget", "nnz_before", "train_epochs")
_FLOAT = ("overlap",)
_JSON = ("layers", "pairs", "widths", "train_config", "train_final", "recipe", "calibration", "written_by")


def _parse(name: str, raw: str) -> Any:
    if name in _INT:
        return int(raw)
    if name in _FLOAT:
        return float(raw)
    return json.loads(raw) if name in _JSON else raw


@dataclass
class FpeMetadata:
    version: str | None = None
    kind: str | None = None  # "mlp" or "hf"
    activation: str | None = None
    # conversion
    alpha: int | None = None
    split: str | None = None
    outgoing: str | None = None
    overlap: float | None = None
    seed: int | None = None
    budget_spec: str | None = None  # as the user gave it
    budget: int | None = None  # non-zeros of the converted matrices after conversion
    nnz_before: int | None = None
    source_sha256: str | None = None
    source: str | None = None  # the converted checkpoint's path, as given
    layers: list[dict] | None = None  # per pair: neurons and non-zeros before and after
    pairs: list[dict] | None = None  # per pair: tensor names
    widths: list[int] | None = None  # MLP chains: every layer's width
    calibration: dict | None = None  # calibrated conversion: data, samples, importance, reconstruction, selection
    # training
    train_data: str | None = None
    train_epochs: int | None = None
    train_config: dict | None = None
    train_final: dict | None = None
    recipe: dict | None = None
    written_by: dict | None = None  # io/provenance.py: the command that wrote this file, and from what
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def converted(self) -> bool:
        return self.alpha is not None

    def tied(self) -> dict[str, int]:
        """Outgoing matrices whose children's columns are tied copies (`--outgoing tied`) -> α. Such a matrix is
        stored with its copies (every runtime loads it) but holds, and counts, one column per parent."""
        if self.outgoing != "tied" or not self.alpha or not self.pairs:
            return {}
        return {p["out"]: self.alpha for p in self.pairs}

    @staticmethod
    def read(strings: dict[str, str]) -> FpeMetadata:
        """Parse the `fpewiden.*` keys of a safetensors header's metadata (other keys are not ours)."""
        known = {f.name for f in dataclasses.fields(FpeMetadata)} - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, str] = {}
        for key, raw in strings.items():
            if not key.startswith(PREFIX):
                continue
            name = key[len(PREFIX) :]
            if name not in known:
                extra[name] = raw
                continue
            try:
                values[name] = _parse(name, raw)
            except ValueError:
                extra[name] = raw  # unreadable: carried along, never trusted
        return FpeMetadata(**values, extra=extra)

    def strings(self) -> dict[str, str]:
        """The `fpewiden.*` keys as safetensors stores them; unset fields are left out."""
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None:
                continue
            out[PREFIX + f.name] = json.dumps(v) if f.name in _JSON else str(v)
        out.update({PREFIX + k: v for k, v in self.extra.items() if PREFIX + k not in out})
        return out

    def public(self) -> dict[str, Any]:
        """A JSON-ready view for reports (`inspect --json`, convert's summary)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {k: v for k, v in {**d, **self.extra}.items() if v is not None}
