"""One refit from the pair's calibration statistics: the Gram matrices accumulated in token chunks, the relative
ridge chosen on held-out tokens (or the prior kept where no refit beats it there), the solver by its cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fpewiden.fpe import solvers
from fpewiden.fpe.pair_function import Rows, token_slices
from fpewiden.fpe.solvers import obs_prune, refit_cg, refit_cost, refit_rows

RIDGES = (1e-3, 1e-2, 1e-1, 1.0)  # relative ridges tried by the held-out choice, weakest first
HOLDOUT = 0.2  # share of calibration tokens (the last ones: whole sentences) that choose the ridge
SELECT_ROWS = 32  # output rows the choice is scored on (evenly spaced over the rows that keep weights)


@dataclass(frozen=True)
class Refit:
    """A refit's rows and bias, and the relative ridge used (None: no refit beat the prior on held-out tokens,
    so the prior rows and bias were kept)."""

    w: torch.Tensor
    b: torch.Tensor | None
    ridge: float | None
    solver: str = "exact"


def _moments(f: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Uncentered sufficient statistics of a block of tokens: FᵀF, TᵀF, ΣF, ΣT, count."""
    return f.T @ f, t.T @ f, f.sum(0), t.sum(0), len(f)


def _moments_over(features: Rows, target: Rows, parts: list[slice], into: tuple | None = None) -> tuple:
    """`_moments` of the tokens in `parts`, accumulated chunk by chunk in place (one chunk: exactly `_moments`);
    `into`: moments to add them to (overwritten)."""
    if into is None:
        g, c, sf, st, n = _moments(features(parts[0]), target(parts[0]))
        parts = parts[1:]
    else:
        g, c, sf, st, n = into
    for part in parts:
        f, t = features(part), target(part)
        g.addmm_(f.T, f)
        c.addmm_(t.T, f)
        sf += f.sum(0)
        st += t.sum(0)
        n += len(f)
        del f, t
    return g, c, sf, st, n


def _rows(t: torch.Tensor | Rows) -> Rows:
    return t if callable(t) else (lambda part: t[part])


def _centered(
    parts: list[tuple], with_bias: bool, consume: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram and cross products over the tokens of `parts` (centered when a bias absorbs the means), and means.
    `consume`: the first part's tensors may be overwritten (no copy of a Gram matrix is made)."""
    n = sum(p[4] for p in parts)
    mf = sum(p[2] for p in parts) / n
    mt = sum(p[3] for p in parts) / n
    if len(parts) == 1 and not with_bias:
        return parts[0][0], parts[0][1], mf, mt
    g, c = (parts[0][0], parts[0][1]) if consume else (parts[0][0].clone(), parts[0][1].clone())
    for p in parts[1:]:
        g.add_(p[0])
        c.add_(p[1])
    if with_bias:
        g.addr_(mf, mf, alpha=-n)
        c.addr_(mt, mf, alpha=-n)
    return g, c, mf, mt


def refit(
    features: torch.Tensor | Rows,
    target: torch.Tensor | Rows,
    mask: torch.Tensor,
    ridge: float | None,
    with_bias: bool,
    prior: torch.Tensor | None = None,
    prior_bias: torch.Tensor | None = None,
    solver: str = "exact",
    device: str = "cpu",
    tokens: int | None = None,
    chunk: int | None = None,
    consume_prior: bool = False,
) -> Refit:
    """Rows of W (targets × features) on the kept features, and the bias, minimizing ‖target − features·Wᵀ − b‖²
    + λ‖W − prior‖². With a bias, both sides are centered so the bias is not shrunk.

    `features` and `target` are tensors (tokens × width), or functions giving their rows for a range of the
    `tokens` tokens, so neither need ever exist whole: the statistics are accumulated `chunk` tokens at a time
    (default: all at once). `ridge` None chooses λ on held-out tokens: each of RIDGES is fitted on the first
    (1 − HOLDOUT) of the tokens for SELECT_ROWS sample rows, by the same solver, and scored on the rest, against
    keeping the prior rows and `prior_bias` as they are (no refit). The winner is refitted on all tokens; if no
    refit wins, nothing is solved at all. So a refit is only made where it predicts tokens it did not see better
    than the weights it replaces. `solver`: see `solve_rows`; "auto" takes the exact one where it costs under
    EXACT_MAX. `device`: where the statistics and solves run (fp32 there too); the result comes back to the
    mask's device. `consume_prior`: the caller no longer needs `prior`, whose memory may hold the result.
    """
    if solver == "auto":
        solver = "exact" if refit_cost(mask) <= solvers.EXACT_MAX else solvers.SCALABLE
    n = tokens if tokens is not None else len(features)  # type: ignore[arg-type]
    f_rows, t_rows = _rows(features), _rows(target)
    home = mask.device
    if torch.device(device) != home:
        m = mask.to(device)  # "cpu:0" is "cpu" once a tensor is there: the recursion stops at the tensor's device
        moved = refit(
            lambda part: f_rows(part).to(device), lambda part: t_rows(part).to(device), m, ridge, with_bias,
            *(t.to(device) if t is not None else None for t in (prior, prior_bias)), solver, str(m.device), n, chunk,
            consume_prior,
        )  # fmt: skip
        return Refit(moved.w.to(home), moved.b.to(home) if moved.b is not None else None, moved.ridge, moved.solver)
    size = chunk or n
    hold = round(HOLDOUT * n) if ridge is None else 0
    if ridge is not None or hold < 2 or n - hold < 2:
        parts = [_moments_over(f_rows, t_rows, token_slices(0, n, size))]
        chosen: float | None = ridge if ridge is not None else RIDGES[0]
    else:  # the held-out tokens' statistics join the fit's after the choice: one Gram matrix at a time
        held = token_slices(n - hold, n, size)
        fit = _moments_over(f_rows, t_rows, token_slices(0, n - hold, size))
        chosen = _choose_ridge(fit, f_rows, t_rows, held, mask, with_bias, prior, prior_bias, solver)
        parts = [_moments_over(f_rows, t_rows, held, into=fit)] if chosen is not None else []
        del fit
    if chosen is None:
        assert prior is not None
        return Refit(prior.to(torch.float32), prior_bias if with_bias else None, None, solver)
    gram, cross, mf, mt = _centered(parts, with_bias, consume=True)
    del parts
    w = solve_rows(solver, gram, cross, mask, chosen, prior, consume_prior).to(gram.dtype)
    return Refit(w, (mt - w @ mf) if with_bias else None, chosen, solver)


def solve_rows(
    solver: str,
    gram: torch.Tensor,
    cross: torch.Tensor,
    mask: torch.Tensor,
    ridge: float,
    prior: torch.Tensor | None,
    consume_prior: bool = False,
) -> torch.Tensor:
    """The masked ridge refit of every row by one solver: "exact", one Cholesky per row (refit_rows); "cg",
    conjugate gradients to the same solution from the prior (refit_cg: one matrix multiply per iteration, no
    factorisation); "obs", the dense ridge solution W* = (C + λP)(G + λI)⁻¹ pruned to the mask by SparseGPT's
    update (obs_prune: one inverse per matrix). `consume_prior`: the prior's memory may hold the result (conjugate
    gradients then need no rows × cols matrix of their own). Since ‖T − W·F‖² = ‖T − W*·F‖² + ‖(W* − W)·F‖² for the
    least-squares W*, pruning W* by OBS minimises the exact refit's objective approximately (kept weights of
    columns already eliminated are not revisited)."""
    if solver == "exact":
        return refit_rows(gram, cross, mask, ridge, prior)
    if solver == "cg":
        start = prior if prior is not None else torch.zeros_like(cross)
        reuse = consume_prior and prior is not None and prior.dtype == torch.float32 and prior.is_contiguous()
        return refit_cg(gram, cross, mask, ridge, prior, start, out=prior if reuse else None)[0]
    if solver != "obs":
        raise ValueError(f"unknown solver {solver!r}")
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    g = gram.to(torch.float64).clone()
    g.diagonal().add_(lam)
    rhs = cross.to(torch.float64) + (lam * prior.to(torch.float64) if prior is not None else 0.0)
    dense = torch.linalg.solve(g, rhs.T).T.to(torch.float32)  # G symmetric
    return obs_prune(dense, mask, gram)


def _choose_ridge(
    fit: tuple,
    f_rows: Rows,
    t_rows: Rows,
    held: list[slice],
    mask: torch.Tensor,
    with_bias: bool,
    prior: torch.Tensor | None,
    prior_bias: torch.Tensor | None,
    solver: str = "exact",
) -> float | None:
    """The relative ridge of RIDGES with the least error on the `held` tokens on sample rows, or None when keeping
    the prior (and `prior_bias`) does at least as well. Ties go to the stronger ridge."""
    live = torch.nonzero(mask.any(1)).flatten()
    if len(live) == 0:
        return RIDGES[0]
    spots = torch.linspace(0, len(live) - 1, min(SELECT_ROWS, len(live)), device=live.device)
    pick = live[spots.round().long().unique()]
    gram, cross, mf, mt = _centered([fit], with_bias)
    fits: dict[float | None, tuple[torch.Tensor, torch.Tensor | float]] = {}
    for lam in RIDGES:
        w = solve_rows(solver, gram, cross[pick], mask[pick], lam, prior[pick] if prior is not None else None)
        fits[lam] = (w, (mt[pick] - w @ mf) if with_bias else 0.0)
    if prior is not None:
        fits[None] = (prior[pick], prior_bias[pick] if with_bias and prior_bias is not None else 0.0)
    errors = dict.fromkeys(fits, 0.0)
    for part in held:  # one pass over the held-out tokens scores every candidate
        f, t_pick = f_rows(part), t_rows(part)[:, pick]
        for k, (w, b) in fits.items():
            errors[k] += float(((t_pick - f @ w.T - b) ** 2).sum())
    best = min(errors.values())
    order = ([None] if None in errors else []) + list(reversed(RIDGES))  # strongest first
    return next(k for k in order if errors[k] <= best)
