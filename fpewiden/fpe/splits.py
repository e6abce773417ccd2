"""How a parent neuron's incoming weights are partitioned over its α children.

Every split returns an assignment: an int8 tensor shaped like the incoming matrix (neurons × inputs) whose entry
(i, j) names the child of neuron i that receives input j. Entries outside the parent's support are meaningless;
expansion masks them out. Keeping splits separate from expansion means a new split is one function here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fpewiden.fpe.expand import row_counts


def random_assignment(
    support: torch.Tensor, alpha: int, generator: torch.Generator, fan_in: torch.Tensor | None = None
) -> torch.Tensor:
    """A balanced random partition per neuron: child sizes over the parent's support differ by at most one.

    Dealing a uniformly shuffled support round-robin is the same as labelling it with a random permutation
    modulo α, so each row costs one randperm: no sort of the whole matrix.
    """
    h, d = support.shape
    out = torch.zeros((h, d), dtype=torch.int8)
    counts = (row_counts(support) if fan_in is None else fan_in).tolist()
    for i, f in enumerate(counts):
        if f == d:
            out[i] = torch.randperm(d, generator=generator) % alpha
        elif f:
            out[i, support[i]] = (torch.randperm(f, generator=generator) % alpha).to(torch.int8)
    return out


def shared_assignment(support: torch.Tensor, alpha: int, generator: torch.Generator) -> torch.Tensor:
    """One balanced random partition of the inputs, shared by every neuron of the layer (`grouped:1`).

    Child c of every neuron reads the same input subset, so after one input permutation the widened incoming
    matrix is α dense blocks: the structure `export --layout fast` runs as dense MatMuls.
    """
    return grouped_assignment(support, alpha, 1, generator)


def neuron_groups(h: int, groups: int) -> torch.Tensor:
    """Group of each neuron: `groups` contiguous runs of (nearly) equal size."""
    return (torch.arange(h) * groups) // h


def grouped_assignment(support: torch.Tensor, alpha: int, groups: int, generator: torch.Generator) -> torch.Tensor:
    """`groups` groups of neurons (contiguous), each with one balanced random partition of the inputs.

    Between per-neuron partitions (G = neurons) and one shared partition (G = 1): the incoming matrix is G·α
    dense blocks after permuting inputs per group, so it exports as gathers and dense MatMuls, while neurons of
    different groups still split their inputs differently.
    """
    h, d = support.shape
    groups = max(1, min(groups, h))
    child = torch.empty(groups, d, dtype=torch.int8)
    for g in range(groups):
        child[g, torch.randperm(d, generator=generator)] = (torch.arange(d) % alpha).to(torch.int8)
    return child[neuron_groups(h, groups)]


def owner_groups(groups: Sequence[Sequence[int]], n_inputs: int) -> list[list[int]]:
    """Make groups exclusive: an input listed by several groups belongs to the first one that lists it.

    Inputs listed by no group become singleton groups, so the balancing below spreads them randomly.
    """
    owner = [-1] * n_inputs
    for g, members in enumerate(groups):
        for j in members:
            if owner[j] < 0:
                owner[j] = g
    exclusive: list[list[int]] = [[] for _ in groups]
    singles: list[list[int]] = []
    for j, g in enumerate(owner):
        if g < 0:
            singles.append([j])
        else:
            exclusive[g].append(j)
    return [m for m in exclusive if m] + singles


def group_assignment(
    support: torch.Tensor, alpha: int, groups: Sequence[Sequence[int]], generator: torch.Generator
) -> torch.Tensor:
    """Keep each group of inputs inside one child and balance the children's fan-in, per neuron.

    For every neuron, groups are taken largest first (random order among equal sizes) and each goes to the child
    with the smallest fan-in so far (random among ties). Sizes count only the neuron's own support, so a pruned
    parent is balanced on what it really has. Different neurons get different random spreads.
    """
    h, d = support.shape
    exclusive = owner_groups(groups, d)
    n_groups = len(exclusive)
    membership = torch.zeros((d, n_groups), dtype=torch.float32)
    group_of = torch.empty(d, dtype=torch.long)
    for g, members in enumerate(exclusive):
        idx = torch.tensor(members, dtype=torch.long)
        membership[idx, g] = 1.0
        group_of[idx] = g
    sizes = support.to(torch.float32) @ membership  # (h, groups): fan-in of each group per neuron
    keys = sizes + 0.5 * torch.rand((h, n_groups), generator=generator)
    order = keys.argsort(dim=1, descending=True)
    load = torch.zeros((h, alpha), dtype=torch.float32)
    child_of_group = torch.empty((h, n_groups), dtype=torch.int8)
    rows = torch.arange(h)
    for k in range(n_groups):
        g = order[:, k]
        child = (load + 0.5 * torch.rand((h, alpha), generator=generator)).argmin(dim=1)
        load[rows, child] += sizes[rows, g]
        child_of_group[rows, g] = child.to(torch.int8)
    return child_of_group[:, group_of]


def cluster_inputs(w_in: torch.Tensor, n_clusters: int, generator: torch.Generator, iters: int = 25) -> list[list[int]]:
    """Cluster input dimensions whose weight columns overlap, i.e. by the Gram matrix W_inᵀW_in.

    Spherical k-means on the columns with |cosine| as similarity (two inputs interfere whatever the sign of
    their overlap). Data-free: the weights alone stand in for the clauses the paper aligns children with.
    """
    cols = w_in.to(torch.float32).T  # (d, h)
    d = cols.shape[0]
    n_clusters = max(1, min(n_clusters, d))
    norms = cols.norm(dim=1, keepdim=True)
    x = cols / norms.clamp_min(1e-12)
    # k-means++ style seeding on |cos|, deterministic under the generator
    first = int(torch.randint(d, (1,), generator=generator))
    centers = [x[first]]
    best = (x @ x[first]).abs()
    for _ in range(1, n_clusters):
        weights = (1.0 - best).clamp_min(0) + 1e-9
        nxt = int(torch.multinomial(weights, 1, generator=generator))
        centers.append(x[nxt])
        best = torch.maximum(best, (x @ x[nxt]).abs())
    c = torch.stack(centers)
    labels = torch.zeros(d, dtype=torch.long)
    for _ in range(iters):
        sim = x @ c.T
        labels = sim.abs().argmax(dim=1)
        signs = torch.sign(sim.gather(1, labels[:, None])).squeeze(1)
        signs[signs == 0] = 1.0
        new = torch.zeros_like(c).index_add_(0, labels, x * signs[:, None])
        empty = new.norm(dim=1) == 0
        new[empty] = c[empty]
        new = new / new.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if torch.allclose(new, c):
            break
        c = new
    return [torch.nonzero(labels == k).flatten().tolist() for k in range(n_clusters) if (labels == k).any()]


def feature_assignment(
    w_in: torch.Tensor, support: torch.Tensor, alpha: int, generator: torch.Generator
) -> torch.Tensor:
    """The paper's data-free clause analogue: Gram-matrix clusters of inputs, spread evenly over children.

    4·α clusters: enough that greedy balancing can even out the children, few enough that inputs which share
    neurons in the trained weights stay together.
    """
    clusters = cluster_inputs(w_in * support, 4 * alpha, generator)
    return group_assignment(support, alpha, clusters, generator)


def overlap_children(
    assignment: torch.Tensor, support: torch.Tensor, alpha: int, overlap: float, generator: torch.Generator
) -> torch.Tensor:
    """The overlap control: each supported input also goes to one other child with probability `overlap`.

    Returns the second child per (neuron, input), -1 where there is none. With overlap 0 children partition the
    parent (FPE); with overlap 1 every input reaches two children.
    """
    h, d = assignment.shape
    pick = (torch.rand((h, d), generator=generator) < overlap) & support
    shift = (
        torch.randint(1, alpha, (h, d), generator=generator, dtype=torch.int64)
        if alpha > 1
        else torch.zeros((h, d), dtype=torch.int64)
    )
    other = ((assignment.to(torch.int64) + shift) % alpha).to(torch.int8)
    return torch.where(pick, other, torch.tensor(-1, dtype=torch.int8))
