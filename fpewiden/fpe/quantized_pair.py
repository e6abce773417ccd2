"""Quantize a converted pair's weights on calibration data (`quantize_pair`), as GPTQ does layer by layer: the
incoming matrices from the pair's inputs, then the outgoing matrix from the activations of the *quantized*
incoming matrices, so it compensates their error too. Pure tensor math, no I/O; the pair is not mutated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fpewiden.fpe.expand import Pair
from fpewiden.fpe.pair_function import PairFunction, activations, chunk_rows, pre_activations, token_slices
from fpewiden.gptq import gptq, output_error
from fpewiden.quantize import Grid, round_to_nearest


@dataclass
class QuantizedPair:
    pair: Pair  # the same masks; quantized matrices hold q · s (fp32)
    scales: list[torch.Tensor | None]  # per matrix (incoming..., outgoing): (rows, groups), None where not quantized
    errors: list[float | None]  # per matrix: ‖(W − Ŵ) Xᵀ‖ / ‖W Xᵀ‖ on the calibration inputs, None where not quantized


def _quantize(w, m, gram, grid: Grid, compensate: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    if compensate:
        w_hat, s = gptq(w, m, gram, grid)
    else:
        w_hat, s = round_to_nearest(w.to(torch.float32) * m, grid)
    return w_hat, s, output_error(w, w_hat, gram)


def quantize_pair(
    pair: Pair,
    x: torch.Tensor,
    fn: PairFunction,
    grid: Grid,
    which: list[bool],
    compensate: bool = True,
    unit_in: int = 1,
) -> QuantizedPair:
    """Quantize the matrices `which` selects (incoming..., outgoing) of `pair` on `grid`; `x` (tokens × inputs):
    the pair's calibration inputs. `compensate`: GPTQ (else round to nearest, the ablation). `unit_in`: rows of
    the incoming matrices that share a scale (α for an FPE pair whose every neuron is widened, so the packed
    parent layout can hold them)."""
    x = x.to(torch.float32)
    gram_x = x.T @ x
    w_in, scales, errors = list(pair.w_in), [], []
    in_grid = Grid(grid.qmax, grid.group_size, unit_in)
    for i, (w, m) in enumerate(zip(pair.w_in, pair.m_in, strict=True)):
        if not which[i]:
            scales.append(None)
            errors.append(None)
            continue
        w_in[i], s, err = _quantize(w, m, gram_x, in_grid, compensate)
        scales.append(s)
        errors.append(err)
    del gram_x
    quantized = Pair(w_in, pair.m_in, pair.b_in, pair.w_out, pair.m_out)
    if not which[-1]:
        return QuantizedPair(quantized, [*scales, None], [*errors, None])
    gram_h = None
    for part in token_slices(0, len(x), chunk_rows(pair.neurons)):
        h = activations(pre_activations(quantized, x[part]), fn)
        gram_h = h.T @ h if gram_h is None else gram_h.addmm_(h.T, h)
    assert gram_h is not None
    w_out, s, err = _quantize(pair.w_out, pair.m_out, gram_h, grid, compensate)
    out = Pair(w_in, pair.m_in, pair.b_in, w_out.to(pair.w_out.dtype), pair.m_out)
    return QuantizedPair(out, [*scales, s], [*errors, err])
