"""YAML recipes: one file pins a whole experiment (data, model, protocol, conversions, optimizer, seeds).

Unknown keys are errors, so a typo never silently falls back to a default. CLI flags override recipe values, and
the resolved recipe is saved with every output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fpewiden.errors import FpewidenError
from fpewiden.train.trainer import TrainConfig

BUILTIN = Path(__file__).resolve().parent.parent / "recipes"  # the repository's recipes/ (editable install)


@dataclass
class Conversion:
    alpha: int = 2
    split: str = "random"
    budget: str = "same"
    outgoing: str = "copy"
    overlap: float = 0.0
    dropconnect: float = 0.0  # fine-tune this model with DropConnect (a baseline; alpha 1 = dense + DropConnect)
    # > 0: after fine-tuning, magnitude-prune back to the warm model's non-zero count and fine-tune this many more
    # epochs (taken from the fine-tuning epochs, without DropConnect): how a budget "all" baseline is deployed
    prune_epochs: int = 0

    @property
    def label(self) -> str:
        label = self._model()
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


@dataclass
class ModelSpec:
    hidden: list[int] = field(default_factory=lambda: [8])
    activation: str = "relu"
    checkpoint: str | None = None


@dataclass
class Recipe:
    name: str
    data: str
    model: ModelSpec = field(default_factory=ModelSpec)
    epochs: int = 30
    warmup_epochs: int = 5
    conversions: list[Conversion] = field(default_factory=lambda: [Conversion()])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr: float = 1e-2
    batch_size: int = 128
    optimizer: str = "adam"
    weight_decay: float = 0.0
    device: str = "auto"
    description: str = ""
    bench_repeat: int = 50  # timed runs per model, engine and batch size in run's closing bench; 0 skips it

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
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _check_keys(section: str, data: dict, cls: type) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise FpewidenError(f"recipe {section}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")


def recipe_from_dict(raw: dict) -> Recipe:
    if not isinstance(raw, dict):
        raise FpewidenError("a recipe is a YAML mapping")
    _check_keys("top level", raw, Recipe)
    if "data" not in raw:
        raise FpewidenError("recipe: 'data' is required (a DATA spec such as dnf:clauses=16 or digits)")
    raw = dict(raw)
    model = raw.pop("model", {}) or {}
    _check_keys("model", model, ModelSpec)
    convs = raw.pop("conversions", None)
    conversions = []
    for c in convs if convs is not None else [{}]:
        _check_keys("conversions", c, Conversion)
        conversions.append(Conversion(**{k: str(v) if k == "budget" else v for k, v in c.items()}))
    try:
        recipe = Recipe(model=ModelSpec(**model), conversions=conversions, **{"name": "recipe", **raw})
    except TypeError as e:
        raise FpewidenError(f"recipe: {e}") from None
    if not 0 <= recipe.warmup_epochs < recipe.epochs:
        raise FpewidenError("recipe: warmup_epochs must be at least 0 and less than epochs")
    rest = recipe.epochs - recipe.warmup_epochs
    if any(not 0 <= c.prune_epochs < rest for c in recipe.conversions):
        raise FpewidenError(f"recipe: prune_epochs must be at least 0 and less than epochs - warmup_epochs ({rest})")
    if not recipe.seeds:
        raise FpewidenError("recipe: seeds must list at least one seed")
    return recipe


def read_yaml(path: Path) -> dict:
    import yaml

    if not path.is_file():
        builtin = BUILTIN / f"{path.name}" if path.suffix else BUILTIN / f"{path}.yaml"
        if builtin.is_file():
            path = builtin
        else:
            raise FpewidenError(
                f"no such recipe: {path} (built-in: {', '.join(p.stem for p in BUILTIN.glob('*.yaml'))})"
            )
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FpewidenError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None


def load_recipe(path: Path, overrides: dict | None = None) -> Recipe:
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    raw.update(overrides or {})
    return recipe_from_dict(raw)


def train_config(recipe: Path | None, flags: dict) -> TrainConfig:
    """Training settings for finetune: defaults, then the recipe's, then explicit flags."""
    values = asdict(TrainConfig())
    if recipe is not None:
        r = load_recipe(recipe)
        values.update(
            lr=r.lr,
            batch_size=r.batch_size,
            optimizer=r.optimizer,
            weight_decay=r.weight_decay,
            device=r.device,
            epochs=r.epochs - r.warmup_epochs,
        )
    values.update(flags)
    return TrainConfig(**values)
