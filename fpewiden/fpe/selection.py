"""What calibration measures before it cuts: which neurons to widen and how to split them, and what each weight
is worth.

- `wasserstein_to_gaussian`: how far each neuron's standardized pre-activation distribution is from a Gaussian
  (Wasserstein neurons, arXiv 2509.24198): the neurons selective expansion widens (`select_neurons`).
- `activation_split`: a data-aware partition of an expanded neuron's inputs.
- `expand_selected`: FPE with a children count per neuron (1 = not expanded).
- `saliency`: what removing each weight costs, measured in the same unit for both matrices of the pair.
"""

from __future__ import annotations

import math

import torch

from fpewiden.fpe.expand import Pair
from fpewiden.fpe.pair_function import PairFunction, activations, derivative, pre_activations, token_slices


def normal_quantiles(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (math.sqrt(2.0) * torch.erfinv(2 * p - 1)).to(dtype)


def wasserstein_to_gaussian(h: torch.Tensor) -> torch.Tensor:
    """Per column of `h` (tokens × neurons): the 1-D Wasserstein-1 distance between the standardized empirical
    distribution and N(0, 1), from sorted values against Gaussian quantiles. Constant columns score as far as
    a point mass is (mean |q|), not 0."""
    z = (h - h.mean(0)) / h.std(0).clamp_min(1e-12)
    return (z.sort(dim=0).values - normal_quantiles(h.shape[0], h.dtype)[:, None]).abs().mean(0)


def select_neurons(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The `round(fraction · neurons)` highest-scoring neurons (ties to the lower index), as a bool mask."""
    n = round(fraction * scores.numel())
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    if n:
        order = torch.sort(scores, descending=True, stable=True).indices
        keep[order[:n]] = True
    return keep


def activation_split(
    w: torch.Tensor, support: torch.Tensor, x_cov: torch.Tensor, alpha: int, iters: int = 40
) -> torch.Tensor:
    """A data-aware partition of each neuron's inputs into α balanced children.

    A neuron's pre-activation is a sum of contributions w_j·x_j. Inputs whose contributions rise and fall
    together on the calibration data (features of the same kind) should feed the same child, and groups that
    move against each other different children, so that children are rarely large together. The leading
    eigenvector of the contributions' covariance diag(w)·Cov(x)·diag(w) (power iteration, batched over neurons)
    orders the inputs; the order is cut into α contiguous parts of equal size over the neuron's support.
    Returns the assignment (neurons × inputs, int8) as the other splits do.
    """
    h, d = w.shape
    wm = (w * support).to(torch.float32)
    v = torch.ones(h, d) / math.sqrt(d)
    for _ in range(iters):
        v = wm * ((wm * v) @ x_cov)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    key = torch.where(support, v, torch.inf)  # unsupported inputs last: they are no child's
    order = key.argsort(dim=1, stable=True)
    fan_in = support.sum(1, keepdim=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(d).expand(h, d).contiguous())
    child = (rank * alpha) // fan_in.clamp_min(1)
    return child.clamp_max(alpha - 1).to(torch.int8)


def expand_selected(pair: Pair, counts: torch.Tensor, assignment: torch.Tensor) -> tuple[Pair, torch.Tensor]:
    """FPE with `counts[i]` children for neuron i (1: the neuron stays as it is). Children are parent-major rows;
    child c of neuron i takes input j where assignment[i, j] == c; each child gets bias b/counts[i]; outgoing
    columns are copied. Returns the expanded pair (nothing pruned) and each row's parent."""
    parent = torch.repeat_interleave(torch.arange(len(counts)), counts)
    first = torch.cumsum(counts, 0) - counts
    child = torch.arange(len(parent)) - first[parent]
    take = assignment.to(torch.int64)[parent] == child[:, None]
    m_in = [m[parent] & take for m in pair.m_in]
    w_in = [w[parent] * m for w, m in zip(pair.w_in, m_in, strict=True)]
    b_in = [None if b is None else (b / counts.to(b.dtype))[parent] for b in pair.b_in]
    return Pair(w_in, m_in, b_in, pair.w_out[:, parent], pair.m_out[:, parent]), parent


def _slopes(pre: list[torch.Tensor], fn: PairFunction):
    """∂a/∂h of each incoming matrix's pre-activations, one at a time (each tokens × neurons)."""
    if fn.gated:
        yield derivative(fn.act, pre[0]) * pre[1]
        yield fn.act(pre[0])
    else:
        yield derivative(fn.act, pre[0])


def saliency(pair: Pair, x: torch.Tensor, fn: PairFunction, chunk: int | None = None) -> list[torch.Tensor]:
    """What removing each weight costs: the norm, over the calibration tokens, of the change it makes in the pair's
    output, to first order. The same unit for every matrix, so one global budget can compare them.

    outgoing W_out[r, c]: |W_out[r, c]| · ‖a_c‖ (the weight times its input, as Wanda scores);
    incoming W[i, j]:     |W[i, j]| · ‖∂a_i/∂h_i ⊙ x_j‖ · ‖W_out[:, i]‖ (its pre-activation change, through the
    activation's slope on each token, into every output the neuron feeds).
    Scores follow the pair's order: incoming matrices, then the outgoing one. The sums of squares over tokens are
    accumulated `chunk` tokens at a time (default: all at once).
    """
    col = pair.w_out.to(x.dtype).norm(dim=0)  # ‖W_out[:, i]‖
    a_sq: torch.Tensor | float = 0.0
    s_sq: list[torch.Tensor | None] = [None] * len(pair.w_in)
    for part in token_slices(0, len(x), chunk or len(x)):
        xs = x[part]
        pre = pre_activations(pair, xs)
        a = activations(pre, fn)
        a_sq = a_sq + (a * a).sum(0)
        del a  # tokens × neurons each: one slope at a time keeps the peak at four such tensors
        x2 = xs * xs
        for k, d in enumerate(_slopes(pre, fn)):
            d = d.square()  # not in place: a linear activation's slope is a broadcast view of ones
            q = s_sq[k]
            s_sq[k] = d.T @ x2 if q is None else q.addmm_(d.T, x2)
            del d
        del pre
    out_score = pair.w_out.abs().to(x.dtype) * torch.as_tensor(a_sq).sqrt()[None, :]
    in_scores = [
        w.abs().to(x.dtype) * q.clamp_min(0).sqrt() * col[:, None]  # type: ignore[union-attr]
        for w, q in zip(pair.w_in, s_sq, strict=True)
    ]
    return [*in_scores, out_score]
