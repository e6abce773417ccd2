"""Small checkpoints that tests build themselves."""

import itertools
from pathlib import Path

import torch
from safetensors.torch import save_file


def mlp_state(widths=(12, 16, 10, 3), seed=0, density=1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        w = torch.randn(b, a, generator=g)
        if density < 1.0:
            w = w * (torch.rand(b, a, generator=g) < density)
            w[:, :4] = torch.randn(b, 4, generator=g)  # keep fan-in >= 4 so α up to 4 can split
        sd[f"{2 * i}.weight"] = w
        sd[f"{2 * i}.bias"] = torch.randn(b, generator=g)
    return sd


def write_mlp(path: Path, **kw) -> Path:
    save_file(mlp_state(**kw), str(path))
    return path
