"""Hugging Face model families: where their feed-forward pairs live and which config field holds the width."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from fpewiden.arch.base import PairSpec, natural_key
from fpewiden.errors import FpewidenError
from fpewiden.io.checkpoint import Checkpoint


@dataclass(frozen=True)
class Family:
    """One FFN layout: a regex that finds each layer's prefix, and how the pair's tensors are named under it."""

    model_types: frozenset[str]
    anchor: str  # regex on weight names; group "p" is the layer prefix
    ins: tuple[str, ...]  # module suffixes of the incoming projections
    out: str
    transposed: bool = False
    config_key: Callable[[str, dict], str] = lambda prefix, cfg: "intermediate_size"
    activation_key: str = "hidden_act"
    act: str = "intermediate.intermediate_act_fn"  # the activation module, under the layer's prefix
    gated: bool = False  # act(gate x) * (up x): the two incoming projections play different roles


def _clip_key(prefix: str, cfg: dict) -> str:
    if "text_config" not in cfg:  # CLIPTextModel / CLIPVisionModel have a flat config
        return "intermediate_size"
    return "text_config.intermediate_size" if "text_model" in prefix else "vision_config.intermediate_size"


FAMILIES: dict[str, Family] = {
    "bert": Family(
        frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert", "vit", "deit", "data2vec-text"}),
        r"^(?P<p>.*)\.intermediate\.dense\.weight$",
        ("intermediate.dense",),
        "output.dense",
    ),
    "gated": Family(
        frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"}),
        r"^(?P<p>.*)\.mlp\.gate_proj\.weight$",
        ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj",
        act="mlp.act_fn",
        gated=True,
    ),
    "gpt2": Family(
        frozenset({"gpt2"}),
        r"^(?P<p>.*)\.mlp\.c_fc\.weight$",
        ("mlp.c_fc",),
        "mlp.c_proj",
        transposed=True,
        config_key=lambda prefix, cfg: "n_inner",
        activation_key="activation_function",
        act="mlp.act",
    ),
    "opt": Family(
        frozenset({"opt"}),
        r"^(?P<p>.*)\.fc1\.weight$",
        ("fc1",),
        "fc2",
        config_key=lambda prefix, cfg: "ffn_dim",
        activation_key="activation_function",
        act="activation_fn",
    ),
    "clip": Family(
        frozenset({"clip", "clip_text_model", "clip_vision_model", "siglip"}),
        r"^(?P<p>.*)\.mlp\.fc1\.weight$",
        ("mlp.fc1",),
        "mlp.fc2",
        config_key=_clip_key,
        act="mlp.activation_fn",
    ),
}
SUPPORTED = sorted(t for f in FAMILIES.values() for t in f.model_types)


def family_of(config: dict) -> Family:
    model_type = str(config.get("model_type", ""))
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise FpewidenError(f"unsupported architecture model_type={model_type!r}; supported: {', '.join(SUPPORTED)}")


def find_hf_pairs(ck: Checkpoint) -> list[PairSpec]:
    assert ck.config is not None
    fam = family_of(ck.config)
    anchor = re.compile(fam.anchor)
    prefixes = sorted({m["p"] for n in ck.shapes if (m := anchor.match(n))}, key=natural_key)
    pairs = []
    for p in prefixes:
        ins = tuple(f"{p}.{s}.weight" for s in fam.ins)
        out = f"{p}.{fam.out}.weight"
        missing = [n for n in (*ins, out) if n not in ck.shapes]
        if missing:
            raise FpewidenError(f"{ck.path}: layer {p} lacks {missing[0]}")
        biases = tuple(f"{p}.{s}.bias" if f"{p}.{s}.bias" in ck.shapes else None for s in fam.ins)
        out_bias = f"{p}.{fam.out}.bias" if f"{p}.{fam.out}.bias" in ck.shapes else None
        pairs.append(PairSpec(p, ins, biases, out, fam.transposed, fam.config_key(p, ck.config), out_bias))
    if not pairs:
        raise FpewidenError(f"no expandable layer found in {ck.path} (model_type={ck.config.get('model_type')!r})")
    return pairs


def config_activation(config: dict, pair: PairSpec) -> str:
    """The activation a pair's neurons use, as its config names it (recorded in metadata)."""
    fam = family_of(config)
    section = config
    if pair.config_key and "." in pair.config_key:
        section = config.get(pair.config_key.split(".")[0], {})
    return str(section.get(fam.activation_key, section.get("activation", "unknown")))


def set_config_width(config: dict, key: str, width: int) -> None:
    node = config
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = width
