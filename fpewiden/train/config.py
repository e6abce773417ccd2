"""Training settings, one typed schema for the CLI flags and the recipes that set them.

`TrainingSettings` holds what both set (optimizer, learning rate, batch, device, threads) with its types and
ranges; `TrainConfig` (one fine-tuning run) and `Recipe` (recipes.py) build on it, so a constraint is written
once. Validation errors become one line that names the flag (`--lr`) or the recipe key (`recipe key 'lr'`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fpewiden.errors import FpewidenError

STRICT = ConfigDict(extra="forbid", strict=True, validate_assignment=True)
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]
LearningRate = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
OPTIMIZERS = ("adam", "adamw", "sgd")


def yaml_float(v: object) -> object:
    """PyYAML reads `1e-3` (no dot) as a string: accept numeric text where a float is expected, nothing else."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


class TrainingSettings(BaseModel):
    model_config = STRICT

    lr: LearningRate = 1e-3
    batch_size: Annotated[int, Field(ge=1)] = 128
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Annotated[int, Field(ge=0)] = 0  # torch intra-op threads; 0: chosen from the work per step

    _floats = field_validator("lr", "weight_decay", mode="before")(yaml_float)


class TrainConfig(TrainingSettings):
    """One fine-tuning run."""

    epochs: Annotated[int, Field(ge=1)] = 10
    seed: int = 0
    dropconnect: Probability = 0.0  # per-step probability of dropping each weight of the chain (0 = off)
    fsdp: bool = False  # shard parameters, gradients and optimizer state across torchrun's processes (FSDP2)

    @staticmethod
    def of(values: dict) -> TrainConfig:
        """Validated from flags: errors name the flag."""
        try:
            return TrainConfig.model_validate(values)
        except ValidationError as e:
            raise FpewidenError(schema_error(e, flags=True)) from None


def schema_error(err: ValidationError, flags: bool = False) -> str:
    """The first problem of a validation, naming the key (recipes: dotted path; flags: --option) and what it
    expects."""
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"].removeprefix("Value error, ")
    if flags:
        return f"--{loc.replace('_', '-')} {e['input']!r}: {msg[0].lower() + msg[1:]}"
    if e["type"] == "extra_forbidden":
        section, key = loc.rsplit(".", 1) if "." in loc else ("top level", loc)
        return f"recipe {section}: unknown key {key!r}"
    if e["type"] == "missing":
        return f"recipe: {loc!r} is required"
    if not loc:
        return f"recipe: {msg}"
    shown = repr(e["input"]) if not isinstance(e["input"], (dict, list)) else type(e["input"]).__name__
    return f"recipe key {loc!r}: {msg[0].lower() + msg[1:]} (got {shown})"
