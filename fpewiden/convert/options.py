"""What a conversion is asked to do, checked before any file is opened: α, split, budget, targets, baselines.

One model (pydantic, built by keyword only) serves the CLI, recipes (recipes.Conversion.options) and library
callers; each is checked as a whole when it is built, and a refusal is one line naming the flag.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fpewiden.errors import FpewidenError
from fpewiden.fpe.expand import OUTGOING

SPLITS = ("random", "clause", "feature", "shared", "grouped:G", "activation")
IMPORTANCE = ("magnitude", "activation")
SELECT = ("wasserstein", "all")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
# extra keys are mistakes, not options; a model is re-checked when a field is assigned
OPTIONS = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


def split_groups(split: str) -> int | None:
    """G of `grouped:G` (shared is G = 1); None for other splits. A split that is none of SPLITS is refused."""
    if split == "shared":
        return 1
    head, _, g = split.partition(":")
    if head == "grouped" and g.isdigit() and int(g) >= 1:
        return int(g)
    if head == "grouped" or split not in SPLITS:
        raise FpewidenError(f"--split {split!r}: choose one of {', '.join(SPLITS)} (grouped:G needs G ≥ 1)")
    return None


@dataclass(frozen=True)
class Budget:
    """`same` (the pre-conversion non-zero count), an absolute count, a fraction of the original count, or `all`
    (no pruning: every expanded weight kept, so copied outgoing weights add non-zeros — for baselines and
    inspection, not FPE).

    The grammar keeps the two numbers apart: a fraction is written with a point or a percent sign (`0.5`,
    `.5`, `50%`, `1.0`), a count is a plain integer (`300000`). A bare `1` is refused: read as a count it leaves
    one weight in the whole model (a user who meant "everything" lost every FFN that way)."""

    kind: str
    value: float = 0.0

    SPELLINGS = "'same', 'all', a fraction such as 0.5 or 50%, or a count of non-zeros such as 300000"

    @staticmethod
    def parse(text: str) -> Budget:
        t = str(text).strip().lower()
        if t in ("same", "all"):
            return Budget(t)
        if t == "1":
            raise FpewidenError(
                "--budget 1 is ambiguous: write 1.0 or 100% (or 'same') for the original non-zero count, or a count "
                "of non-zeros (an integer, at least one per layer), e.g. 300000"
            )
        if re.fullmatch(r"\d+", t):
            if int(t) == 0:
                raise FpewidenError("--budget 0 leaves no weights; write " + Budget.SPELLINGS)
            return Budget("count", int(t))
        percent = t.endswith("%")
        number = t[:-1].strip() if percent else t
        if not re.fullmatch(r"(\d+\.?\d*|\.\d+)(e-?\d+)?", number) or not (percent or "." in number or "e" in number):
            raise FpewidenError(f"--budget {text!r}: expected " + Budget.SPELLINGS)
        v = float(number) / (100.0 if percent else 1.0)
        if not 0.0 < v <= 1.0:
            raise FpewidenError(
                f"--budget {text!r}: a fraction of the original non-zeros must be in (0, 1] (0% to 100%); "
                "to widen and keep more weights than the original, use 'all' or a count"
            )
        return Budget("fraction", v)

    def total(self, original: int) -> int:
        if self.kind == "all":
            raise ValueError("budget 'all' depends on the expansion, not on the original count")
        if self.kind == "same":
            return original
        if self.kind == "count":
            return int(self.value)
        return round(self.value * original)

    def __str__(self) -> str:
        if self.kind in ("same", "all"):
            return self.kind
        return str(int(self.value)) if self.kind == "count" else str(self.value)


class Calibration(BaseModel):
    """`--calibration`: convert from the model's behaviour on sample data (convert/calibration.py).

    `data`: a text file (Hugging Face models; one sample per line) or a DATA spec (MLPs; its x). `samples` None:
    sentences up to 16k tokens (HF) or 8192 rows (MLP). `select`: which neurons widen — `all` (FPE), or
    `wasserstein` (the share `fraction` farthest from Gaussian). The defaults are the best combination measured
    when widening (bench/results/calibration); on MiniLM no widening beat calibrated pruning (`--alpha 1`).
    """

    model_config = OPTIONS

    data: str
    samples: int | None = None
    importance: str = "activation"
    reconstruct: bool = True
    select: str = "all"
    fraction: float = 0.05
    ridge: float | None = None  # None: chosen per refit on held-out calibration tokens (fpe/ridge.py)
    anchor: bool = True
    refit_incoming: bool = True  # ablations (bench/calibration_domains.py); not flags
    refit_outgoing: bool = True
    solver: str = "auto"  # the refits: exact per-row least squares, cg, obs (SparseGPT's update), auto by cost
    device: str = "auto"  # where the refits run: auto (CUDA when present) | cpu | cuda
    whole_model: bool = False  # HF: the whole model in memory (the reference the block-by-block path is tested on)

    @field_validator("data", mode="before")
    @classmethod
    def _path_text(cls, v: object) -> object:
        return str(v) if isinstance(v, Path) else v

    @model_validator(mode="after")
    def _checked(self) -> Calibration:
        self.validate()
        return self

    def expand_fraction(self, alpha: int) -> float:
        if alpha == 1:
            return 0.0
        return 1.0 if self.select == "all" else self.fraction

    def validate(self) -> None:
        if self.importance not in IMPORTANCE:
            raise FpewidenError(f"--importance {self.importance!r}: choose one of {', '.join(IMPORTANCE)}")
        if self.select not in SELECT:
            raise FpewidenError(f"--select {self.select!r}: choose one of {', '.join(SELECT)}")
        if not 0.0 <= self.fraction <= 1.0:
            raise FpewidenError(f"--expand-fraction {self.fraction}: a share of neurons between 0 and 1")
        if self.samples is not None and self.samples < 8:
            raise FpewidenError(f"--calibration-samples {self.samples}: at least 8")
        from fpewiden.fpe.solvers import SOLVERS

        if self.solver not in SOLVERS:
            raise FpewidenError(f"--solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.ridge is not None and not self.ridge > 0:
            raise FpewidenError(f"ridge {self.ridge}: must be positive")


GROUP_SIZE = 32  # int4's default: one scale per 32 inputs, as ORT's MatMulNBits default block


class Quantization(BaseModel):
    """`--quantize`: the converted pairs' weights on an int8 or 4-bit grid (fpewiden/quantize.py), GPTQ-compensated
    on the calibration data (gptq.py). int8: one scale per output row; int4: one per `group_size` inputs. The
    scales are recorded beside the weights, so `pack --dtype int8` stores exactly these values."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: str
    group_size: int | None = None
    compensate: bool = True  # GPTQ; False rounds to nearest (the ablation bench/quantized_quality.py measures)

    @staticmethod
    def of(bits: str | None, group_size: int | None) -> Quantization | None:
        """From the flags: None without --quantize (--group-size alone is refused); int4's default group."""
        if bits is None:
            if group_size is not None:
                raise FpewidenError("--group-size needs --quantize int4")
            return None
        return Quantization(bits=bits, group_size=GROUP_SIZE if bits == "int4" and group_size is None else group_size)

    @model_validator(mode="after")
    def _checked(self) -> Quantization:
        self.validate()
        return self

    def grid(self):
        from fpewiden.quantize import BITS, Grid

        return Grid(BITS[self.bits], self.group_size)

    def validate(self) -> None:
        from fpewiden.quantize import BITS

        if self.bits not in BITS:
            raise FpewidenError(f"--quantize {self.bits!r}: choose one of {', '.join(BITS)}")
        if self.bits == "int8" and self.group_size is not None:
            raise FpewidenError("--group-size is for --quantize int4; int8 has one scale per output row")
        g = self.group_size
        if g is not None and not (16 <= g <= 1 << 20 and g & (g - 1) == 0):
            raise FpewidenError(f"--group-size {g}: a power of two from 16 (the packed kernels scale whole vectors)")

    def summary(self) -> dict:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "scales": "per output row" if self.group_size is None else f"per {self.group_size} inputs of a row",
            "method": "gptq" if self.compensate else "round to nearest",
        }


class ConvertOptions(BaseModel):
    """α=1 expands nothing: with a budget below `same` the conversion is magnitude pruning of the same matrices,
    the baseline FPE is compared with (and, with calibration, Wanda or SparseGPT-like pruning)."""

    model_config = OPTIONS

    alpha: int
    split: str = "random"
    clauses: list[list[int]] | None = None
    budget: Budget = Field(default_factory=lambda: Budget("same"))
    seed: int = 0
    targets: list[str] = Field(default_factory=list)
    activation: str = "relu"
    outgoing: str = "copy"
    overlap: float = 0.0  # the paper's control: share of inputs that also reach a second child (not FPE when > 0)
    calibration: Calibration | None = None
    quantize: Quantization | None = None

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, v: object) -> object:
        """A budget as the flag spells it ('same', 0.5, '50%', 300000) or a Budget."""
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            return Budget.parse(str(v))
        return v

    @model_validator(mode="after")
    def _checked(self) -> ConvertOptions:
        self.validate()
        return self

    @property
    def groups(self) -> int | None:
        """G of `--split grouped:G` (shared is G = 1); None for other splits."""
        return split_groups(self.split)

    @property
    def expand_fraction(self) -> float:
        """Share of each layer's neurons that get α children (the others keep one)."""
        if self.alpha == 1:
            return 0.0
        return self.calibration.expand_fraction(self.alpha) if self.calibration else 1.0

    def validate(self) -> None:
        """Every option on its own; what needs the checkpoint is checked by the plan."""
        if self.alpha < 1:
            raise FpewidenError(f"--alpha must be at least 1 (got {self.alpha}; 1 prunes without widening)")
        split_groups(self.split)
        if self.split == "clause" and self.clauses is None:
            raise FpewidenError("--split clause needs --clauses FILE")
        if self.split != "clause" and self.clauses is not None:
            raise FpewidenError(f"--clauses is only used by --split clause (got --split {self.split})")
        if not 0.0 <= self.overlap <= 1.0:
            raise FpewidenError(f"--overlap {self.overlap}: a share of inputs between 0 and 1")
        if self.outgoing not in OUTGOING:
            raise FpewidenError(f"--outgoing {self.outgoing!r}: choose one of {', '.join(OUTGOING)}")
        if self.activation not in ACTIVATIONS:
            raise FpewidenError(f"--activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if self.alpha == 1 and (self.overlap or self.outgoing != "copy"):
            raise FpewidenError("--alpha 1 expands nothing: --overlap and --outgoing apply to children")
        if self.split == "activation" and self.calibration is None:
            raise FpewidenError("--split activation partitions inputs by their activity: it needs --calibration FILE")
        if self.calibration is not None:
            self.calibration.validate()
            if self.budget.kind == "all":
                raise FpewidenError("--calibration selects weights for a budget: --budget all keeps every weight")
            if self.overlap or self.outgoing != "copy":
                raise FpewidenError("--calibration converts with copied outgoing weights and no overlap")
        if self.quantize is not None:
            self.quantize.validate()
            if self.calibration is None:
                raise FpewidenError(
                    "--quantize compensates rounding errors on calibration data: give --calibration FILE (to round "
                    "to nearest without data, `fpewiden pack --dtype int8` quantizes every matrix)"
                )
        if self.outgoing == "tied" and self.overlap:
            raise FpewidenError("--outgoing tied sums a parent's children: --overlap does not apply")


def load_clauses(path: Path) -> list[list[int]]:
    if not path.is_file():
        raise FpewidenError(f"no such clauses file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FpewidenError(f"{path} is not valid JSON (expected a list of lists of input indices)") from None
    if isinstance(data, dict) and "clauses" in data:
        data = data["clauses"]
    ok = (
        isinstance(data, list)
        and data
        and all(
            isinstance(c, list) and c and all(isinstance(j, int) and not isinstance(j, bool) for j in c) for c in data
        )
    )
    if not ok:
        raise FpewidenError(f"{path}: expected a non-empty JSON list of non-empty lists of input indices")
    return data
