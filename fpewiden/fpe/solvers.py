"""The refit solvers: masked least squares from Gram matrices, each with its cost and reach.

- `refit_rows`: masked ridge least squares, row by row (exact for the mask; one Cholesky per row,
  O(rows · kept³)).
- `obs_prune`: SparseGPT's optimal-brain-surgeon update for a given mask: one inverse Hessian per matrix, columns
  eliminated in blocks, O(cols³ + rows · cols²): what makes calibration scale to LLM widths.
- `refit_cg`: masked conjugate gradients in row blocks, warm-started from the prior.
"""

from __future__ import annotations

import torch


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
