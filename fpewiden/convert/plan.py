"""The plan of a conversion, from tensor names and shapes alone (no file is read here): which pairs are
converted, every output tensor's shape, which pair finishes which tensor, and the non-zeros each pair owes to
the budget. Knowing every output shape up front is what lets the sink write each file's header first and
stream tensors into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fpewiden.arch import PairSpec
from fpewiden.convert.options import Budget
from fpewiden.errors import EmptyLayerError, FpewidenError
from fpewiden.io.safetensors_stream import DTYPES


def select_pairs(pairs: list[PairSpec], targets: list[str], hf: bool) -> list[PairSpec]:
    """The pairs `--targets` names (all when none). Hugging Face configs hold one width per field, so a
    selection must take all the layers sized by a field or none."""
    if not targets:
        return pairs
    try:
        pats = [re.compile(t) for t in targets]
    except re.error as e:
        raise FpewidenError(f"--targets: invalid regular expression ({e})") from None
    chosen = [p for p in pairs if any(r.search(p.name) for r in pats)]
    if not chosen:
        names = ", ".join(p.name for p in pairs[:8])
        raise FpewidenError(f"--targets matched no expandable layer; layers are: {names}")
    if hf:
        for key in {p.config_key for p in pairs}:
            group = [p for p in pairs if p.config_key == key]
            n = sum(p in chosen for p in group)
            if 0 < n < len(group):
                raise FpewidenError(
                    f"--targets selects {n} of the {len(group)} layers sized by config '{key}'; transformers "
                    "models have one width per config field, so select all of them or none"
                )
    return chosen


def largest_remainder(total: int, weights: list[int]) -> list[int]:
    """Integers proportional to `weights` that sum to `total` exactly."""
    s = sum(weights)
    if s == 0:
        return [0] * len(weights)
    raw = [total * w / s for w in weights]
    base = [int(r // 1) for r in raw]
    rest = total - sum(base)
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - base[i]), i))
    for i in order[:rest]:
        base[i] += 1
    return base


@dataclass
class Plan:
    """`pairs` every expandable pair of the model, `chosen` those converted (forward order)."""

    pairs: list[PairSpec]
    chosen: list[PairSpec]
    alpha: int
    shapes: dict[str, tuple[int, ...]]  # every tensor's shape in the output
    last_use: dict[str, int] = field(default_factory=dict)  # matrix -> index of the last pair that writes it
    reductions: list[int] | None = None  # non-zeros each pair removes; None: budget same or all

    @property
    def matrices(self) -> list[str]:
        """Every matrix a converted pair touches, each once."""
        return sorted({w for p in self.chosen for w in (*p.in_weights, p.out_weight)})

    def owned(self) -> list[list[str]]:
        """Partition the touched matrices among pairs: a matrix belongs to the pair that reads it as input, and
        the last outgoing matrix to the last pair. A pair owes the budget reduction of what it owns."""
        ins = {w for p in self.chosen for w in p.in_weights}
        return [[*p.in_weights, *([p.out_weight] if p.out_weight not in ins else [])] for p in self.chosen]

    def set_budget(self, budget: Budget, nnz: dict[str, int]) -> None:
        """Split the budget's total reduction over the pairs in proportion to the non-zeros they own."""
        if budget.kind in ("same", "all"):
            self.reductions = None
            return
        owned = [sum(nnz[n] for n in group) for group in self.owned()]
        before = sum(owned)
        target = budget.total(before)
        if target <= 0:
            raise FpewidenError(f"--budget {budget} leaves no weights (the layers hold {before} non-zeros)")
        self.reductions = largest_remainder(before - target, owned)
        for p, group, have, cut in zip(self.chosen, self.owned(), owned, self.reductions, strict=True):
            if have - cut < len(group):  # every matrix must keep at least one weight
                raise EmptyLayerError(
                    f"--budget {budget} leaves layer {p.name} {have - cut} weight(s) for its {len(group)} matrices; "
                    f"choose a larger --budget (the layers hold {before:,} non-zeros)"
                )

    def pair_budget(self, k: int, budget: Budget, nnz_now: int) -> int | None:
        """Non-zeros pair k keeps, given what it holds when its turn comes (earlier pairs may have pruned its
        incoming matrix); None keeps everything (budget `all`)."""
        if budget.kind == "all":
            return None
        keep = nnz_now - (self.reductions[k] if self.reductions else 0)
        if keep < 0:
            raise FpewidenError(
                f"--budget {budget} is too small: layer {self.chosen[k].name} would have to keep fewer than zero "
                "weights after the earlier layers' pruning; choose a larger --budget"
            )
        return keep

    def neurons(self, spec: PairSpec, shapes: dict[str, tuple[int, ...]]) -> int:
        s = shapes[spec.in_weights[0]]
        return s[1] if spec.transposed else s[0]


def make_plan(
    shapes: dict[str, tuple[int, ...]],
    dtypes: dict[str, str],
    pairs: list[PairSpec],
    chosen: list[PairSpec],
    alpha: int,
    clauses: list[list[int]] | None = None,
    fraction: float = 1.0,
) -> Plan:
    """Output shapes and write order, and every check the headers alone can decide: weight dtypes, α against
    each layer's inputs, clause indices. Nothing is allocated before these pass.

    `fraction`: share of each layer's neurons that get α children (selective expansion; 1 for FPE): a layer of
    h neurons becomes h + (α−1)·round(fraction·h) wide."""
    for p in chosen:
        for name in (*p.in_weights, p.out_weight):
            if not DTYPES[dtypes[name]].is_floating_point:
                raise FpewidenError(
                    f"layer {p.name}: {name} holds {dtypes[name]} values; FPE needs floating-point weights"
                )
        d = shapes[p.in_weights[0]][0 if p.transposed else 1]
        if alpha > d:
            raise FpewidenError(
                f"--alpha {alpha} exceeds the {d} inputs of layer {p.name}: a child would never get an input"
            )
        if clauses is not None:
            bad = [j for c in clauses for j in c if not 0 <= j < d]
            if bad:
                raise FpewidenError(f"clause index {bad[0]} is out of range for layer {p.name}, which has {d} inputs")
    out = dict(shapes)
    last_use: dict[str, int] = {}
    for k, p in enumerate(chosen):
        h = shapes[p.in_weights[0]][1 if p.transposed else 0]
        wide = h + (alpha - 1) * round(fraction * h)
        for w, b in zip(p.in_weights, p.in_biases, strict=True):
            s = out[w]
            out[w] = (s[0], wide) if p.transposed else (wide, s[1])
            if b:
                out[b] = (wide,)
            last_use[w] = k
        s = out[p.out_weight]
        out[p.out_weight] = (wide, s[1]) if p.transposed else (s[0], wide)
        last_use[p.out_weight] = k
    return Plan(pairs, chosen, alpha, out, last_use)
