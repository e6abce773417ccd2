"""`--device auto|cpu|cuda`, one meaning for every command that computes (finetune, calibrated convert)."""

from __future__ import annotations

import torch

from fpewiden.errors import FpewidenError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when this torch sees a device, else the CPU; cuda without one is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FpewidenError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise FpewidenError(f"--device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)
