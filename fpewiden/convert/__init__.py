"""`fpewiden convert`: a checkpoint in, an FPE-widened (or pruned) checkpoint out, streamed pair by pair.

options (what is asked, validated) → plan (pairs, output shapes, budgets; from headers only) → per pair: the
transform (the paper's FPE, or a calibrated method) → the sink (streaming writes) → pipeline (the loop).
"""

from fpewiden.convert.options import (
    ACTIVATIONS,
    SPLITS,
    Budget,
    Calibration,
    ConvertOptions,
    Quantization,
    load_clauses,
)
from fpewiden.convert.pipeline import convert

__all__ = [
    "ACTIVATIONS",
    "SPLITS",
    "Budget",
    "Calibration",
    "ConvertOptions",
    "Quantization",
    "convert",
    "load_clauses",
]
