"""A Hugging Face model's structure without its weights: which checkpoint tensors are Linear (or GPT-2 Conv1D)
weights, and an instance whose parameters live on the meta device (no memory, no initialisation cost) for a
loader to fill in. Buffers (rotary frequencies, position ids) are made for real, as transformers makes them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fpewiden.errors import FpewidenError
from fpewiden.io.checkpoint import Checkpoint


def has_lm_head(config: dict) -> bool:
    """Causal LMs name themselves *ForCausalLM (Llama, Qwen, OPT, …) or GPT2LMHeadModel."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in config.get("architectures") or [])


def empty_model(folder: Path, head: bool = True) -> nn.Module:
    """The model a folder's config.json describes (with its LM head for causal LMs when `head`), parameters on
    meta."""
    try:
        import transformers
    except ImportError:
        raise FpewidenError("Hugging Face checkpoints need transformers: pip install 'fpewiden[hf]'") from None
    transformers.logging.set_verbosity_error()
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise FpewidenError(f"transformers cannot read {folder / 'config.json'}: {str(e).splitlines()[0]}") from None
    auto = transformers.AutoModelForCausalLM if head and has_lm_head(cfg.to_dict()) else transformers.AutoModel
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary frequencies) made for real
        try:
            model = auto.from_config(cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise FpewidenError(f"transformers cannot build the model of {folder}: {str(e).splitlines()[0]}") from None
    return model.float().eval()


def checkpoint_key(model: nn.Module, ck_name: str, params: dict[str, object]) -> str | None:
    """The model's name for a checkpoint tensor (checkpoints of a model with a head prefix its base model)."""
    prefix = f"{getattr(model, 'base_model_prefix', '')}."
    if ck_name in params:
        return ck_name
    if ck_name.startswith(prefix) and ck_name[len(prefix) :] in params:
        return ck_name[len(prefix) :]
    if prefix + ck_name in params:
        return prefix + ck_name
    return None


def linear_weights(ck: Checkpoint, model: nn.Module | None = None) -> dict[str, bool]:
    """Checkpoint tensor name -> transposed, for every weight of a Linear (False) or a GPT-2 Conv1D (True)."""
    model = model if model is not None else empty_model(ck.path)
    params = dict(model.named_parameters(remove_duplicate=False))
    kinds: dict[str, bool] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, nn.Linear):
            kinds[f"{path}.weight"] = False
        elif type(mod).__name__ == "Conv1D" and hasattr(mod, "nf"):
            kinds[f"{path}.weight"] = True
    out = {}
    for name in ck.shapes:
        key = checkpoint_key(model, name, params)
        if key in kinds and len(ck.shapes[name]) == 2:
            out[name] = kinds[key]
    return out


def embedding_weights(ck: Checkpoint, model: nn.Module | None = None) -> list[str]:
    """Checkpoint tensor names of the nn.Embedding tables no other module shares (a tied LM head reads its table
    as a Linear weight, so a tied table is left out)."""
    model = model if model is not None else empty_model(ck.path)
    params = dict(model.named_parameters(remove_duplicate=False))
    users: dict[int, int] = {}
    for p in params.values():
        users[id(p)] = users.get(id(p), 0) + 1
    tables = {f"{path}.weight" for path, mod in model.named_modules(remove_duplicate=False)
              if isinstance(mod, nn.Embedding) and users.get(id(mod.weight), 0) == 1}  # fmt: skip
    return [n for n in ck.shapes if checkpoint_key(model, n, params) in tables and len(ck.shapes[n]) == 2]


def meta_tensors(model: nn.Module) -> list[str]:
    """Parameters and buffers still on the meta device (a loader that left one has lost a weight)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [n for n, t in named if t is not None and t.device.type == "meta"]


def assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in the model at parameter or buffer `key` (replacing a meta tensor of the same shape)."""
    path, _, leaf = key.rpartition(".")
    mod = model.get_submodule(path) if path else model
    old = mod._parameters.get(leaf, mod._buffers.get(leaf))
    if old is not None and tuple(old.shape) != tuple(tensor.shape):
        raise FpewidenError(f"tensor {key} has shape {list(tensor.shape)}; the model expects {list(old.shape)}")
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        mod._buffers[leaf] = tensor
