"""YAML recipes: one file pins a whole experiment (data, model, protocol, conversions, optimizer, seeds).

A typed schema (pydantic, strict: `epochs: ten`, `alpha: two` or `hidden: "8"` are refused, not coerced) checks
every key and value when the recipe is read, before any training runs; every error names the key and the type
or range it expects. Unknown keys are errors, so a typo never silently falls back to a default. CLI flags
override recipe values, and the resolved recipe is saved with every output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from fpewiden.errors import FpewidenError
from fpewiden.train.config import (
    STRICT,
    LearningRate,
    Probability,
    TrainConfig,
    TrainingSettings,
    schema_error,
    yaml_float,
)

BUILTIN = Path(__file__).resolve().parent.parent / "recipes"  # the repository's recipes/ (editable install)


class Conversion(BaseModel):
    model_config = STRICT

    alpha: Annotated[int, Field(ge=1)] = 2
    split: str = "random"  # random, clause, feature, shared, grouped:G or activation (checked below)
    budget: str = "same"
    outgoing: Literal["copy", "grouped", "tied"] = "copy"
    overlap: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    dropconnect: Probability = 0.0  # fine-tune this model with DropConnect (a baseline; alpha 1 = dense + DropConnect)
    # > 0: after fine-tuning, magnitude-prune back to the warm model's non-zero count and fine-tune this many more
    # epochs (taken from the fine-tuning epochs, without DropConnect): how a budget "all" baseline is deployed
    prune_epochs: Annotated[int, Field(ge=0)] = 0
    # calibrated conversion on the recipe's training data (convert --calibration): None = the paper's conversion
    calibrate: bool = False
    importance: Literal["magnitude", "activation"] = "activation"
    reconstruct: bool = True
    select: Literal["wasserstein", "all"] = "all"
    expand_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0
    # after fine-tuning, the model's weights on each of these grids (its mask kept), scored as a row of its own:
    # GPTQ on the recipe's training inputs (convert --quantize), or round to nearest with `gptq: false`
    quantize: list[Literal["int8", "int4"]] = Field(default_factory=list)
    group_size: Annotated[int, Field(ge=16)] | None = None  # int4: inputs per scale (default 32)
    gptq: bool = True

    _floats = field_validator("overlap", "dropconnect", "expand_fraction", mode="before")(yaml_float)

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        """the same splits as convert's --split, grouped:G included (convert/options.py decides)."""
        from fpewiden.convert.options import split_groups

        try:
            split_groups(v)
        except FpewidenError:
            raise ValueError("expected random, clause, feature, shared, grouped:G (G ≥ 1) or activation") from None
        return v

    @field_validator("budget", mode="before")
    @classmethod
    def _budget_text(cls, v: object) -> str:
        """YAML reads `budget: 0.5` as a number; budgets are parsed from text like the CLI flag."""
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise ValueError("expected 'same', 'all', a count or a fraction")
        from fpewiden.convert import Budget

        try:
            Budget.parse(str(v))
        except FpewidenError:
            raise ValueError("expected 'same', 'all', a non-zero count, or a fraction in (0, 1]") from None
        return str(v)

    def options(self, *, seed: int, activation: str, data: str, clauses: list[list[int]] | None = None):
        """The convert options this entry asks for (one model for the CLI, recipes and library callers)."""
        from fpewiden.convert import Calibration, ConvertOptions

        calibration = None
        if self.calibrate:  # on the recipe's own training data
            calibration = Calibration(
                data=data,
                importance=self.importance,
                reconstruct=self.reconstruct,
                select=self.select,
                fraction=self.expand_fraction,
            )
        return ConvertOptions(
            alpha=self.alpha,
            split=self.split,
            clauses=clauses,
            budget=self.budget,
            seed=seed,
            activation=activation,
            outgoing=self.outgoing,
            overlap=self.overlap,
            calibration=calibration,
        )

    @model_validator(mode="after")
    def _quantize(self) -> Conversion:
        if len(set(self.quantize)) != len(self.quantize):
            raise ValueError("quantize: each of int8, int4 at most once")
        if self.group_size is not None and "int4" not in self.quantize:
            raise ValueError("group_size is for quantize: [int4]; int8 has one scale per output row")
        for bits in self.quantize:  # convert's own checks (an int8 group, a group that is no power of two)
            try:
                self.quantization(bits)
            except (FpewidenError, ValidationError) as e:
                msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
                raise ValueError(msg.replace("--quantize", "quantize").replace("--group-size", "group_size")) from None
        return self

    def quantization(self, bits: str):
        """convert's options for one of `quantize`'s grids."""
        from fpewiden.convert.options import Quantization

        q = Quantization.of(bits, self.group_size if bits == "int4" else None)
        return q.model_copy(update={"compensate": self.gptq})

    def quantized_label(self, bits: str) -> str:
        group = f", group {self.quantization(bits).group_size}" if bits == "int4" else ""
        return f"{self.label}, {bits}{group} ({'GPTQ' if self.gptq else 'round to nearest'})"

    @property
    def label(self) -> str:
        label = self._model()
        if self.calibrate:
            label += ", calibrated" + (f" (widen {self.expand_fraction:g})" if self.select == "wasserstein" else "")
            if not self.reconstruct:
                label += " without refit"
            if self.importance == "magnitude":
                label += ", magnitude importance"
        if self.dropconnect:
            label += f" + DropConnect {self.dropconnect}"
        if self.prune_epochs:
            label += f", magnitude-pruned to the dense count ({self.prune_epochs} epochs)"
        return label

    def _model(self) -> str:
        if self.overlap == 1.0 and self.budget == "all":  # every child a full copy of its parent: a wider dense net
            return f"wide dense ×{self.alpha}"
        if self.alpha == 1:
            if self.budget == "same":
                return "dense" if self.dropconnect else "dense (α=1)"
            return f"magnitude pruning, budget {self.budget}"
        b = "" if self.budget == "same" else (", no pruning" if self.budget == "all" else f", budget {self.budget}")
        o = "" if self.outgoing == "copy" else f", {self.outgoing} outgoing"
        if self.overlap:
            o += f", overlap {self.overlap}"
        return f"FPE α={self.alpha} {self.split}{o}{b}"


class ModelSpec(BaseModel):
    model_config = STRICT

    hidden: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = Field(default_factory=lambda: [8])
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"
    checkpoint: str | None = None


class Recipe(TrainingSettings):
    """An experiment. Optimizer, batch, device and threads are TrainingSettings (shared with finetune's flags)."""

    name: str = "recipe"
    data: str
    model: ModelSpec = Field(default_factory=ModelSpec)
    epochs: Annotated[int, Field(ge=1)] = 30
    warmup_epochs: Annotated[int, Field(ge=0)] = 5
    conversions: list[Conversion] = Field(default_factory=lambda: [Conversion()])
    seeds: Annotated[list[int], Field(min_length=1)] = Field(default_factory=lambda: [0, 1, 2])
    lr: LearningRate = 1e-2
    description: str = ""
    bench_repeat: Annotated[int, Field(ge=0)] = 50  # timed runs per model, engine and batch in run's closing bench

    @model_validator(mode="after")
    def _protocol(self) -> Recipe:
        if self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be less than epochs")
        rest = self.epochs - self.warmup_epochs
        if any(c.prune_epochs >= rest for c in self.conversions):
            raise ValueError(f"prune_epochs must be less than epochs - warmup_epochs ({rest})")
        data = self.data.strip()
        if any(c.split == "clause" for c in self.conversions) and not (data == "dnf" or data.startswith("dnf:")):
            raise ValueError("split clause needs a dnf: task (its clauses are the split)")
        labels = [c.label for c in self.conversions]
        labels += [c.quantized_label(b) for c in self.conversions for b in c.quantize]
        if twice := sorted({x for x in labels if labels.count(x) > 1}):
            # results are kept by label: two such rows would be scored as one model with twice the seeds
            raise ValueError(f"two conversions give the same model, {twice[0]!r}: make one differ (or drop it)")
        return self

    def train_config(self, epochs: int, seed: int, dropconnect: float = 0.0) -> TrainConfig:
        return TrainConfig(
            dropconnect=dropconnect,
            epochs=epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            seed=seed,
            device=self.device,
            threads=self.threads,
        )

    def to_dict(self) -> dict:
        return self.model_dump()


def recipe_from_dict(raw: object) -> Recipe:
    if not isinstance(raw, dict):
        raise FpewidenError(f"a recipe is a YAML mapping of keys to values (this one is a {type(raw).__name__})")
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise FpewidenError(schema_error(e)) from None


def recipe_path(path: Path) -> Path:
    """A recipe file, or the name of a built-in one (`polysemantic` is recipes/polysemantic.yaml)."""
    if path.is_file():
        return path
    builtin = BUILTIN / path.name if path.suffix else BUILTIN / f"{path}.yaml"
    if builtin.is_file():
        return builtin
    raise FpewidenError(f"no such recipe: {path} (built-in: {', '.join(p.stem for p in BUILTIN.glob('*.yaml'))})")


def read_yaml(path: Path) -> object:
    import yaml

    path = recipe_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FpewidenError(f"{path} is not a text file (a recipe is YAML)") from None
    if "\0" in text:
        raise FpewidenError(f"{path} is not a text file (a recipe is YAML)")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FpewidenError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return {} if data is None else data


def load_recipe(path: Path, overrides: dict | None = None) -> Recipe:
    raw = read_yaml(path)
    if isinstance(raw, dict):
        raw.setdefault("name", recipe_path(path).stem)
        raw.update(overrides or {})
    return recipe_from_dict(raw)


def train_config(recipe: Path | None, flags: dict, distill: bool = False) -> TrainConfig:
    """Training settings for finetune: defaults, then the recipe's, then explicit flags.

    Distillation has its own defaults (lr 1e-4, batch 32): with the MLP defaults (1e-3, 128) a MiniLM student
    ended further from its teacher than it started (bench/results/distill_defaults).
    """
    values = TrainConfig().model_dump()
    if distill:
        values.update(DISTILL_DEFAULTS)
    if recipe is not None:
        r = load_recipe(recipe)
        values.update(
            lr=r.lr,
            batch_size=r.batch_size,
            optimizer=r.optimizer,
            weight_decay=r.weight_decay,
            device=r.device,
            threads=r.threads,
            epochs=r.epochs - r.warmup_epochs,
        )
    values.update(flags)
    return TrainConfig.of(values)


DISTILL_DEFAULTS = {"lr": 1e-4, "batch_size": 32}
