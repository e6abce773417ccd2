"""Calibrated conversion of one pair (`calibrate_pair`): widen the selected neurons, prune the pair to its budget
by saliency and refit what is kept to the pair's original output on calibration data, as pure tensor math (no
I/O, no model). The pieces: pair_function.py (the pair's function in token chunks), selection.py (what to widen
and what each weight is worth), solvers.py and ridge.py (the refits).

Everything here sees a pair (neuron-major incoming matrices, outgoing matrix, biases) and `x`, the pair's inputs on
calibration data (tokens × inputs), already passed through every earlier converted layer. The target is the pair
as it was, applied to those inputs, as SparseGPT does: each pair corrects the error of the ones before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fpewiden.fpe.expand import Pair
from fpewiden.fpe.pair_function import PairFunction, activations, chunk_rows, pair_output, pre_activations, token_slices
from fpewiden.fpe.ridge import refit as fit_rows
from fpewiden.fpe.selection import expand_selected, saliency, select_neurons, wasserstein_to_gaussian


@dataclass(frozen=True, kw_only=True)
class CalibratedOptions:
    """`fraction`: share of each layer's neurons expanded (by Wasserstein distance; 1: all, as FPE; 0: none,
    which is calibrated pruning). `importance`: magnitude or activation (saliency). `reconstruct`: refit the kept
    weights to the pair's original output. `ridge`: relative ridge of the refits (None: chosen on held-out tokens)."""

    alpha: int
    fraction: float = 1.0
    importance: str = "activation"
    reconstruct: bool = True
    ridge: float | None = None  # None: chosen per refit on held-out calibration tokens (ridge.py)
    anchor: bool = True  # the refits' ridge pulls towards the converted weights (True) or towards zero
    refit_incoming: bool = True  # children reproduce their unpruned pre-activations (ablations switch it off)
    refit_outgoing: bool = True  # the outgoing matrix reproduces the pair's original output
    solver: str = "auto"  # exact (refit_rows) | obs (obs_prune) | auto: exact where it costs under EXACT_MAX
    device: str = "cpu"  # where the refits (Gram matrices and solves, the cost that grows with width) run


@dataclass
class CalibratedPair:
    pair: Pair  # expanded (rows parent-major), masked to the budget, refitted
    b_out: torch.Tensor | None
    expanded: int  # how many neurons were widened
    error_before: float  # relative output error of the expanded, pruned pair before the refit
    error_after: float  # after it (equal when there is no refit)
    ridges: list[float | None] = field(default_factory=list)  # per refit made (incoming, then outgoing): the
    # relative ridge used; None where keeping the weights beat every refit on held-out tokens
    solvers: list[str] = field(default_factory=list)  # per refit made: exact or obs


def _output_error(pair: Pair, x: torch.Tensor, fn: PairFunction, b_out, target: torch.Tensor, chunk: int) -> float:
    """‖pair(x) − target‖ / ‖target‖, chunk by chunk."""
    err = ref = 0.0
    for part in token_slices(0, len(x), chunk):
        err += float((pair_output(pair, x[part], fn, b_out) - target[part]).square().sum())
        ref += float(target[part].square().sum())
    return math.sqrt(err) / max(math.sqrt(ref), 1e-30)


def _refit_incoming(
    x: torch.Tensor,
    w_full: torch.Tensor,
    b: torch.Tensor | None,
    w_kept: torch.Tensor,
    m: torch.Tensor,
    m_full: torch.Tensor,
    opts: CalibratedOptions,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None, float | None, str] | None:
    """Each child of one incoming matrix that lost inputs reproduces its unpruned pre-activation (None: none lost,
    or the refit is off). Returns the matrix (`w_kept` refitted in place where it is fp32), its bias, the ridge and
    the solver. A function of its own so that its temporaries (the lost rows, the prior, the fit) die with it."""
    lost = (m != m_full).any(1)
    if not opts.refit_incoming or not bool(lost.any()):
        return None
    every = bool(lost.all())  # usual at half budget: the rows are the matrices themselves, not copies of them
    w_lost = (w_full if every else w_full[lost]).to(x.dtype)
    prior = (w_kept if every else w_kept[lost]).to(x.dtype) if opts.anchor else None
    zero = torch.zeros(int(lost.sum()), dtype=x.dtype)  # no refit: the bias stays as it is
    fit = fit_rows(
        x, lambda part: x[part] @ w_lost.T, m[lost], opts.ridge, b is not None, prior, zero, opts.solver,
        opts.device, len(x), chunk, consume_prior=True,
    )  # fmt: skip  # the prior is `w_kept`, refitted in place anyway, or a copy of its rows
    w = w_kept.to(x.dtype)  # this pair's own masked copy (or its fp32 form): refitted in place
    if fit.w.data_ptr() != w.data_ptr():  # the same tensor where keeping the prior won and no rows were copied
        w[lost] = fit.w
    nb = None
    if b is not None:
        nb = b.clone().to(x.dtype)
        nb[lost] = b[lost].to(x.dtype) + fit.b
        nb = nb.to(b.dtype)
    return w.to(w_kept.dtype), nb, fit.ridge, fit.solver


def calibrate_pair(
    pair: Pair,
    x: torch.Tensor,
    fn: PairFunction,
    b_out: torch.Tensor | None,
    opts: CalibratedOptions,
    split: Callable[[Pair, torch.Tensor, torch.Tensor], torch.Tensor],
    budget: int | None,
    release: bool = False,
) -> CalibratedPair:
    """Widen the selected neurons, keep exactly `budget` weights by importance, refit what is kept.

    `x` (tokens × inputs): the pair's inputs on calibration data. `split(pair, support, selected)` gives the
    children assignment (neurons × inputs). The target is the pair's own output on `x`. Only tensors at the
    model's width (`x`, the target) are held over all tokens; everything at the pair's neurons is computed
    `chunk_rows` tokens at a time (saliency, errors, the refits' statistics). `release`: the caller hands the pair
    over; its weights and masks are dropped (emptied in place) once the incoming refits are done, so the outgoing
    refit does not run beside the unpruned matrices and their supports.
    """
    x = x.to(torch.float32)
    n = len(x)
    small = chunk_rows(pair.neurons)  # chunks of the original pair's width
    target = torch.cat([pair_output(pair, x[part], fn, b_out) for part in token_slices(0, n, small)])
    h = pair.neurons
    if opts.alpha > 1 and opts.fraction > 0:
        chosen = torch.ones(h, dtype=torch.bool) if opts.fraction >= 1 else None
        if chosen is None:  # each neuron's distribution over every token: the first pre-activations, held whole
            first = Pair(pair.w_in[:1], pair.m_in[:1], pair.b_in[:1], pair.w_out, pair.m_out)
            chosen = select_neurons(wasserstein_to_gaussian(pre_activations(first, x)[0]), opts.fraction)
    else:
        chosen = torch.zeros(h, dtype=torch.bool)
    counts = torch.where(chosen, opts.alpha, 1)
    if bool(chosen.any()):
        support = pair.support()
        assignment = torch.where(chosen[:, None], split(pair, support, chosen).to(torch.int8), 0)
        ex, _ = expand_selected(pair, counts, assignment)
    else:  # nothing widened (calibrated pruning): the pair as it is, not a copy of its weights
        ex = pair
    chunk = chunk_rows(ex.neurons)  # chunks of the widened pair
    full_masks = [*ex.m_in, ex.m_out]
    if budget is None:
        masks = [m.clone() for m in full_masks]
    else:
        if opts.importance == "magnitude":
            scores = [w.abs() for w in (*ex.w_in, ex.w_out)]
        else:
            scores = saliency(ex, x, fn, chunk)
        from fpewiden.fpe.expand import keep_largest

        masks = keep_largest(scores, full_masks, budget)
        del scores
    w_in = [w * m for w, m in zip(ex.w_in, masks[:-1], strict=True)]  # the unpruned ones are the refits' targets
    # nothing needs the unpruned outgoing matrix from here: pruned in place where it is this function's
    w_out = ex.w_out.mul_(masks[-1]) if release or ex is not pair else ex.w_out * masks[-1]
    pruned = Pair(w_in, masks[:-1], ex.b_in, w_out, masks[-1])
    before = _output_error(pruned, x, fn, b_out, target, chunk)
    if not opts.reconstruct:
        return CalibratedPair(pruned, b_out, int(chosen.sum()), before, before)
    # incoming: each child that lost inputs reproduces its unpruned pre-activation
    new_in, new_b = [], []
    ridges: list[float | None] = []
    solvers: list[str] = []
    for w_full, b, w_kept, m, m_full in zip(ex.w_in, ex.b_in, w_in, masks[:-1], full_masks[:-1], strict=True):
        refitted = _refit_incoming(x, w_full, b, w_kept, m, m_full, opts, chunk)
        if refitted is None:
            new_in.append(w_kept)
            new_b.append(b)
            continue
        w, nb, ridge, solver = refitted
        new_in.append(w)
        new_b.append(nb)
        ridges.append(ridge)
        solvers.append(solver)
    # the unpruned weights (the loop's names too): only the refitted ones are needed from here
    del w_full, w_kept, refitted, ex, w_in, pruned, full_masks
    if release:
        pair.w_in[:] = [w.new_empty(0) for w in pair.w_in]
        pair.w_out = pair.w_out.new_empty(0)
        pair.m_in[:] = [m.new_empty(0) for m in pair.m_in]  # the support as read: the budget's masks replace it
        pair.m_out = pair.m_out.new_empty(0)
    # outgoing (and its bias): the pair's original output from the refitted children's activations
    refit = Pair(new_in, masks[:-1], new_b, w_out, masks[-1])
    if not opts.refit_outgoing:
        after = _output_error(refit, x, fn, b_out, target, chunk)
        return CalibratedPair(refit, b_out, int(chosen.sum()), before, after, ridges, solvers)
    prior_out = w_out.to(x.dtype) if opts.anchor else None
    fit = fit_rows(
        lambda part: activations(pre_activations(refit, x[part]), fn), target, masks[-1], opts.ridge,
        b_out is not None, prior_out, b_out, opts.solver, opts.device, n, chunk, consume_prior=True,
    )  # fmt: skip  # nothing reads the pruned outgoing matrix after its refit
    w_fit, b_fit = fit.w, fit.b
    ridges.append(fit.ridge)
    solvers.append(fit.solver)
    refit = Pair(new_in, masks[:-1], new_b, w_fit.to(w_out.dtype), masks[-1])
    b_new = b_fit.to(b_out.dtype) if b_out is not None and b_fit is not None else b_out
    after = _output_error(refit, x, fn, b_new, target, chunk)
    return CalibratedPair(refit, b_new, int(chosen.sum()), before, after, ridges, solvers)
