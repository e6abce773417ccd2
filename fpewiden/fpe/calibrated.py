"""Calibrated conversion of one pair: the data-aware pieces, as pure tensor math (no I/O, no model).

Everything here sees a pair (neuron-major incoming matrices, outgoing matrix, biases) and `x`, the pair's inputs on
calibration data (tokens × inputs), already passed through every earlier converted layer. The target is the pair
as it was, applied to those inputs, as SparseGPT does: each pair corrects the error of the ones before it.

- `wasserstein_to_gaussian`: how far each neuron's standardized pre-activation distribution is from a Gaussian
  (Wasserstein neurons, arXiv 2509.24198): the neurons selective expansion widens.
- `activation_split`: a data-aware partition of an expanded neuron's inputs.
- `expand_selected`: FPE with a children count per neuron (1 = not expanded).
- `saliency`: what removing each weight costs, measured in the same unit for both matrices of the pair.
- `refit_rows`: masked ridge least squares, row by row, from Gram matrices (exact for the mask; one Cholesky per
  row, O(rows · kept³)).
- `obs_prune`: SparseGPT's optimal-brain-surgeon update for a given mask: one inverse Hessian per matrix, columns
  eliminated in blocks, O(cols³ + rows · cols²): what makes calibration scale to LLM widths.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fpewiden.fpe.expand import Pair

Activation = Callable[[torch.Tensor], torch.Tensor]
Rows = Callable[[slice], torch.Tensor]  # a tensor's rows for a range of tokens, computed when asked for

# Tokens are worked through in chunks whose fp32 rows at the pair's widest point (its neurons, α× when widened)
# take about this much: what is held over all tokens stays at the model's width (inputs, targets), so a pair's
# peak no longer grows with tokens × FFN width (bench/results/calibration_memory).
CHUNK_BYTES = 16 << 20


def chunk_rows(width: int) -> int:
    """Tokens per chunk at this width (at least 256)."""
    return max(256, CHUNK_BYTES // (4 * max(1, width)))


def _slices(lo: int, hi: int, size: int) -> list[slice]:
    return [slice(i, min(hi, i + size)) for i in range(lo, hi, max(1, size))]


@dataclass(frozen=True)
class PairFunction:
    """How the pair computes: `act(W_in x + b)`, or `act(gate x) * (up x)` for gated MLPs (two incoming)."""

    act: Activation
    gated: bool = False


def pre_activations(pair: Pair, x: torch.Tensor) -> list[torch.Tensor]:
    """(tokens × neurons) per incoming matrix, biases included."""
    out = []
    for w, b in zip(pair.w_in, pair.b_in, strict=True):
        h = x @ w.to(x.dtype).T
        out.append(h + b.to(x.dtype) if b is not None else h)
    return out


def activations(pre: list[torch.Tensor], fn: PairFunction) -> torch.Tensor:
    return fn.act(pre[0]) * pre[1] if fn.gated else fn.act(pre[0])


def pair_output(pair: Pair, x: torch.Tensor, fn: PairFunction, b_out: torch.Tensor | None) -> torch.Tensor:
    y = activations(pre_activations(pair, x), fn) @ pair.w_out.to(x.dtype).T
    return y + b_out.to(x.dtype) if b_out is not None else y


def _derivative(act: Activation, h: torch.Tensor) -> torch.Tensor:
    """act'(h) elementwise, by autograd (every supported activation is elementwise)."""
    h = h.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(act(h).sum(), h)
    return g


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
        yield _derivative(fn.act, pre[0]) * pre[1]
        yield fn.act(pre[0])
    else:
        yield _derivative(fn.act, pre[0])


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
    for part in _slices(0, len(x), chunk or len(x)):
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


def refit_rows(
    gram: torch.Tensor,
    cross: torch.Tensor,
    mask: torch.Tensor,
    ridge: float,
    prior: torch.Tensor | None = None,
    budget_bytes: int = 256 << 20,
) -> torch.Tensor:
    """Masked ridge least squares, one independent problem per row.

    Row r fits its target from the features it keeps (mask[r]): w_S = (G_SS + λI)⁻¹ (c_S + λ p_S), where G is the
    features' Gram matrix (features × features), c = cross[r] their products with row r's target and p the
    prior row the ridge pulls towards (zero when None). λ = ridge × the mean of diag(G), so the solve stays
    positive definite when features are dead or collinear (rank-deficient activations). Rows are solved in
    batches padded to the longest row (padding is an identity block) by Cholesky in float32, 2.5× faster than
    float64 here; a batch whose factorisation fails is redone in float64.
    Returns the fitted rows (rows × features), zero where the mask is.
    """
    rows, n = mask.shape
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    dev = gram.device
    g = torch.zeros(n + 1, n + 1, dtype=torch.float32, device=dev)
    g[:n, :n] = gram.to(torch.float32)
    rhs_rows = cross.to(torch.float32) + (lam * prior.to(torch.float32) if prior is not None else 0.0)
    c = torch.cat([rhs_rows, torch.zeros(rows, 1, device=dev)], dim=1)
    width = int(mask.sum(1).max()) if rows else 0
    out = torch.zeros(rows, n, dtype=torch.float32, device=dev)
    if width == 0:
        return out
    # each row's kept features first (in order), then the padding feature n
    idx = torch.where(mask, torch.arange(n, device=dev).expand(rows, n), n).sort(dim=1).values[:, :width]
    chunk = max(1, budget_bytes // (4 * width * width * 3))
    for s in range(0, rows, chunk):
        ix = idx[s : s + chunk]
        pad = ix == n
        sub = g[ix[:, :, None], ix[:, None, :]]
        sub.diagonal(dim1=1, dim2=2).add_(torch.where(pad, 1.0, lam))  # identity for padding, λ for real features
        rhs = c[torch.arange(s, s + len(ix), device=dev)[:, None], ix].unsqueeze(-1)
        factor, info = torch.linalg.cholesky_ex(sub)
        if bool(info.any()):
            sol = torch.cholesky_solve(rhs.double(), torch.linalg.cholesky(sub.double())).float()
        else:
            sol = torch.cholesky_solve(rhs, factor)
        sol = sol.squeeze(-1)
        rr = torch.arange(s, s + len(ix), device=dev)[:, None].expand_as(ix)
        out[rr[~pad], ix[~pad]] = sol[~pad]
    return out


OBS_DAMP = 0.01  # SparseGPT's dampening: 1% of the Hessian's mean diagonal
OBS_BLOCK = 128  # columns eliminated together before the rest of the matrix is updated


def obs_prune(w: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor, damp: float = OBS_DAMP,
              block: int = OBS_BLOCK) -> torch.Tensor:  # fmt: skip
    """Zero `w` where `mask` is False, compensating in the weights not yet processed, so that ‖(w − ŵ) Xᵀ‖² stays
    small for the inputs whose Gram is `gram` (SparseGPT, Frantar & Alistarh 2023, with the mask given instead
    of chosen: fpewiden's exact budget and tie rule pick it). Column i's error e = (w_i − ŵ_i) / U_ii moves the
    later columns by −e·U_i,· with U the upper Cholesky factor of H⁻¹, H = gram + damp·mean(diag)·I; columns are
    taken in blocks, the block's errors then applied to the rest at once. Inputs that never vary (a zero
    diagonal) get zero weights. One inverse per matrix: O(cols³ + rows·cols²), against one Cholesky per row for
    the exact refit (refit_rows)."""
    cols = w.shape[1]
    W = w.to(torch.float32).clone()
    H = gram.to(torch.float32).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    keep = mask.to(torch.bool)
    for attempt in range(4):  # a factorisation that fails gets 10x the damping
        Hd = H.clone()
        Hd.diagonal().add_(damp * (10**attempt) * float(H.diagonal().mean()))
        L, info = torch.linalg.cholesky_ex(Hd.double() if attempt else Hd)
        if not int(info):
            break
    else:
        raise RuntimeError("the calibration Gram matrix could not be factorised")
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).to(torch.float32)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        K1 = keep[:, i1:i2]
        for i in range(i2 - i1):
            w_i = W1[:, i]
            q = torch.where(K1[:, i], w_i, torch.zeros((), dtype=w_i.dtype, device=w_i.device))
            e = (w_i - q) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            E1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W * keep


CG_TOL = 1e-4  # relative residual at which the masked conjugate gradients stop
CG_ITERS = 60


CG_BYTES = 32 << 20  # rows solved together: conjugate gradients hold seven rows × cols fp32 matrices per row block


def refit_cg(
    gram: torch.Tensor,
    cross: torch.Tensor,
    mask: torch.Tensor,
    ridge: float,
    prior: torch.Tensor | None,
    start: torch.Tensor,
    tol: float = CG_TOL,
    iters: int = CG_ITERS,
    block_bytes: int = CG_BYTES,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """The exact refit (refit_rows' solution) by conjugate gradients: each row solves (G_SS + λI) w_S = c_S + λ p_S
    on its kept features S, with the products G·p for a block of rows in one matrix multiply per iteration
    (O(rows · cols²)) and no factorisation at all; Jacobi-preconditioned, started from `start`, a block stopped
    when each of its rows' residual is below `tol` of its right-hand side. Rows are independent problems: solving
    them in blocks of about `block_bytes` of working set keeps the solver's memory off the matrix's size (seven
    rows × cols matrices for all rows at once: 322 MB at 2048 × 5632). `out` (rows × cols, fp32): where the rows go;
    it may be `prior` or `start` themselves, since a block reads its own rows of them before writing its result.
    Returns the rows and the most iterations a block ran."""
    rows, cols = mask.shape
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-30))
    G = gram.to(torch.float32)  # (G + λI)·v is G·v + λv: no copy of the Gram matrix (cols² floats)
    dinv = 1.0 / (G.diagonal() + lam).clamp_min(1e-30)
    if out is None:
        out = torch.empty(rows, cols, dtype=torch.float32, device=gram.device)
    size = max(1, block_bytes // (7 * 4 * max(1, cols)))
    most = 0
    for s in range(0, rows, size):
        r = slice(s, min(rows, s + size))
        p_r = prior[r] if prior is not None else None
        out[r], done = _cg_block(G, lam, dinv, cross[r], mask[r], p_r, start[r], tol, iters)
        most = max(most, done)
    return out, most


def _cg_block(
    G: torch.Tensor,
    lam: float,
    dinv: torch.Tensor,
    cross: torch.Tensor,
    mask: torch.Tensor,
    prior: torch.Tensor | None,
    start: torch.Tensor,
    tol: float,
    iters: int,
) -> tuple[torch.Tensor, int]:
    """refit_cg on one block of rows; (G + λI)⁻¹'s Jacobi preconditioner `dinv` is shared by the blocks."""
    m = mask.to(torch.float32)
    b = (cross.to(torch.float32) + (lam * prior.to(torch.float32) if prior is not None else 0.0)) * m
    W = start.to(torch.float32) * m
    R = b - torch.addmm(W, W, G, alpha=1.0, beta=lam) * m
    Z = R * dinv
    P = Z.clone()
    rz = (R * Z).sum(1, keepdim=True)
    scale = b.norm(dim=1).clamp_min(1e-30)
    del b
    done = 0
    while done < iters:
        done += 1
        AP = torch.addmm(P, P, G, beta=lam).mul_(m)
        step = rz / (P * AP).sum(1, keepdim=True).clamp_min(1e-30)
        W.addcmul_(step, P)
        R.sub_(step * AP)
        del AP
        if bool((R.norm(dim=1) <= tol * scale).all()):
            break
        Z = R * dinv
        rz_next = (R * Z).sum(1, keepdim=True)
        P = Z.add_(P.mul_(rz_next / rz.clamp_min(1e-30)))
        rz = rz_next
    return W.mul_(m), done


def refit_cost(mask: torch.Tensor) -> float:
    """Multiply-adds of the exact refit: a Cholesky per row of its kept features."""
    kept = mask.sum(1).to(torch.float64)
    return float((kept**3).sum() / 3)


SOLVERS = ("auto", "exact", "obs", "cg")
# auto: the exact refit up to about this many multiply-adds (a 1024→2816→1024 pair's: 21.6 s on 2 threads).
# Conjugate gradients reach its error on random Llama-shaped pairs, but on MiniLM's real activations they stopped
# a little short (calibrated FPE 0.909 against 0.912 on TREC, bench/results/calibration_domains): exact where it
# is affordable.
EXACT_MAX = 1e12
SCALABLE = "cg"  # auto, above that: bench/results/calibration_solver


@dataclass(frozen=True)
class CalibratedOptions:
    """`fraction`: share of each layer's neurons expanded (by Wasserstein distance; 1: all, as FPE; 0: none,
    which is calibrated pruning). `importance`: magnitude or activation (saliency). `reconstruct`: refit the kept
    weights to the pair's original output. `ridge`: relative ridge of the refits (None: chosen on held-out tokens)."""

    alpha: int
    fraction: float = 1.0
    importance: str = "activation"
    reconstruct: bool = True
    ridge: float | None = None  # None: chosen per refit on held-out calibration tokens (_refit)
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


def _refit(
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
        solver = "exact" if refit_cost(mask) <= EXACT_MAX else SCALABLE
    n = tokens if tokens is not None else len(features)  # type: ignore[arg-type]
    f_rows, t_rows = _rows(features), _rows(target)
    home = mask.device
    if torch.device(device) != home:
        m = mask.to(device)  # "cpu:0" is "cpu" once a tensor is there: the recursion stops at the tensor's device
        moved = _refit(
            lambda part: f_rows(part).to(device), lambda part: t_rows(part).to(device), m, ridge, with_bias,
            *(t.to(device) if t is not None else None for t in (prior, prior_bias)), solver, str(m.device), n, chunk,
            consume_prior,
        )  # fmt: skip
        return Refit(moved.w.to(home), moved.b.to(home) if moved.b is not None else None, moved.ridge, moved.solver)
    size = chunk or n
    hold = round(HOLDOUT * n) if ridge is None else 0
    if ridge is not None or hold < 2 or n - hold < 2:
        parts = [_moments_over(f_rows, t_rows, _slices(0, n, size))]
        chosen: float | None = ridge if ridge is not None else RIDGES[0]
    else:  # the held-out tokens' statistics join the fit's after the choice: one Gram matrix at a time
        held = _slices(n - hold, n, size)
        fit = _moments_over(f_rows, t_rows, _slices(0, n - hold, size))
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


def _output_error(pair: Pair, x: torch.Tensor, fn: PairFunction, b_out, target: torch.Tensor, chunk: int) -> float:
    """‖pair(x) − target‖ / ‖target‖, chunk by chunk."""
    err = ref = 0.0
    for part in _slices(0, len(x), chunk):
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
    fit = _refit(
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
    target = torch.cat([pair_output(pair, x[part], fn, b_out) for part in _slices(0, n, small)])
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
    fit = _refit(
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
