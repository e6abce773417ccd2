"""Built-in tasks. Boolean DNF formulas are the paper's testbed: many clauses crowding few neurons is exactly
the polysemantic regime FPE targets, and the true clauses are known, so clause-aligned splits can use them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fpewiden.errors import FpewidenError


@dataclass(frozen=True)
class DnfSpec:
    """A DNF task: `clauses` conjunctions of `literals` variables each over `inputs` Boolean inputs.

    outputs: 'clauses' (one label per clause, multi-label) or 'or' (one label: the whole formula).
    sampling: 'uniform' bits, or 'planted': each sample satisfies a random clause with probability `plant`,
    so positives are not vanishingly rare when literals are many.
    """

    inputs: int = 32
    clauses: int = 8
    literals: int = 3
    negation: float = 0.5
    sampling: str = "planted"
    plant: float = 0.5
    outputs: str = "clauses"
    n: int = 8000
    val: float = 0.25
    seed: int = 0

    @staticmethod
    def parse(text: str, default_seed: int = 0) -> DnfSpec:
        """`dnf:inputs=32,clauses=8,literals=3,...`; unknown keys or bad values are one-line errors. The task's
        seed is `default_seed` (the command's --seed) unless the spec names one."""
        body = text.split(":", 1)[1] if ":" in text else ""
        fields = {f: type(v) for f, v in asdict(DnfSpec()).items()}
        values: dict[str, object] = {"seed": default_seed}
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, _, raw = item.partition("=")
            if key not in fields:
                raise FpewidenError(f"unknown dnf parameter {key!r}; known: {', '.join(fields)}")
            try:
                values[key] = fields[key](raw)
            except ValueError:
                raise FpewidenError(f"dnf parameter {key}={raw!r} is not a valid {fields[key].__name__}") from None
        spec = DnfSpec(**values)  # type: ignore[arg-type]
        spec.validate()
        return spec

    def validate(self) -> None:
        if not 1 <= self.literals <= self.inputs:
            raise FpewidenError(f"dnf: literals must be between 1 and inputs ({self.inputs})")
        if self.clauses < 1 or self.n < 10:
            raise FpewidenError("dnf: need at least 1 clause and n >= 10 samples")
        if self.sampling not in ("uniform", "planted") or self.outputs not in ("clauses", "or"):
            raise FpewidenError("dnf: sampling is uniform|planted and outputs is clauses|or")
        if not 0.0 < self.val < 1.0:
            raise FpewidenError("dnf: val must be a fraction in (0, 1)")


@dataclass
class DnfTask:
    spec: DnfSpec
    variables: torch.Tensor  # (clauses, literals) input indices
    signs: torch.Tensor  # (clauses, literals) True where the literal is negated
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    def clause_groups(self) -> list[list[int]]:
        """The clauses as `convert --clauses` reads them: lists of input indices."""
        return [sorted(int(v) for v in row) for row in self.variables]


def evaluate_dnf(bits: torch.Tensor, variables: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """(samples, clauses) 0/1: which clauses each bit vector satisfies."""
    lit = bits[:, variables]  # (n, clauses, literals)
    lit = torch.where(signs, 1 - lit, lit)
    return lit.all(dim=2).to(torch.float32)


def make_dnf(spec: DnfSpec) -> DnfTask:
    g = torch.Generator().manual_seed(spec.seed)
    variables = torch.stack([torch.randperm(spec.inputs, generator=g)[: spec.literals] for _ in range(spec.clauses)])
    signs = torch.rand((spec.clauses, spec.literals), generator=g) < spec.negation
    bits = (torch.rand((spec.n, spec.inputs), generator=g) < 0.5).to(torch.int64)
    if spec.sampling == "planted":
        plant = torch.nonzero(torch.rand(spec.n, generator=g) < spec.plant).flatten()
        which = torch.randint(spec.clauses, (len(plant),), generator=g)
        rows = plant[:, None].expand(-1, spec.literals)
        bits[rows, variables[which]] = (~signs[which]).to(torch.int64)
    sat = evaluate_dnf(bits, variables, signs)
    y = sat if spec.outputs == "clauses" else sat.amax(dim=1, keepdim=True)
    x = bits.to(torch.float32) * 2 - 1
    n_val = max(1, int(spec.n * spec.val))
    return DnfTask(spec, variables, signs, x[n_val:], y[n_val:], x[:n_val], y[:n_val])
