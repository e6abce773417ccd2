"""Invariants of the FPE transform, over random shapes, densities, α, budgets and splits."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from fpewiden.fpe import reference
from fpewiden.fpe.expand import Pair, widen_blocks
from fpewiden.fpe.reference import expand
from fpewiden.fpe.splits import feature_assignment, group_assignment, random_assignment, shared_assignment


def widen(pair: Pair, alpha: int, a: torch.Tensor, budget: int | None, outgoing="copy", second=None) -> Pair:
    """The streaming path (what convert runs), its row blocks joined, checked against fpe.reference."""
    parts: dict[int, list] = {}
    for i, _row, w, m in widen_blocks(pair, alpha, a, budget, outgoing, second):
        parts.setdefault(i, []).append((w, m))
    joined = [(torch.cat([w for w, _ in parts[i]]), torch.cat([m for _, m in parts[i]])) for i in sorted(parts)]
    out = Pair([w for w, _ in joined[:-1]], [m for _, m in joined[:-1]], pair.b_in, *joined[-1])
    ref = reference.widen(pair, alpha, a, budget, outgoing, second)
    for x, y in zip([*out.w_in, *out.m_in, out.w_out, out.m_out], [*ref.w_in, *ref.m_in, ref.w_out, ref.m_out]):
        assert torch.equal(x, y)
    out.b_in = ref.b_in
    return out


@st.composite
def pairs(draw):
    h = draw(st.integers(1, 12))
    d = draw(st.integers(4, 24))
    o = draw(st.integers(1, 8))
    alpha = draw(st.integers(2, 4))
    gated = draw(st.booleans())
    density = draw(st.floats(0.3, 1.0))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    n_in = 2 if gated else 1
    w_in = [torch.randn(h, d, generator=g) for _ in range(n_in)]
    m_in = [torch.rand(h, d, generator=g) < density for _ in range(n_in)]
    for m in m_in:  # every live neuron can be split α ways
        m[:, :alpha] = True
    w_in = [w * m for w, m in zip(w_in, m_in)]
    w_out = torch.randn(o, h, generator=g)
    m_out = torch.rand(o, h, generator=g) < density
    w_out = w_out * m_out
    b_in = [torch.randn(h, generator=g) if draw(st.booleans()) else None for _ in range(n_in)]
    split = draw(st.sampled_from(["random", "clause", "feature"]))
    return Pair(w_in, m_in, b_in, w_out, m_out), alpha, split, seed


def assign(pair: Pair, alpha: int, split: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    support = pair.support()
    d = support.shape[1]
    if split == "random":
        return random_assignment(support, alpha, g)
    if split == "clause":
        clauses = [list(range(i, min(d, i + 3))) for i in range(0, d, 3)][: max(1, d // 4)]
        return group_assignment(support, alpha, clauses, g)
    return feature_assignment(pair.w_in[0], support, alpha, g)


@given(pairs(), st.floats(0.2, 1.6))
def test_widen_invariants(case, budget_ratio):
    pair, alpha, split, seed = case
    h, d = pair.w_in[0].shape
    a = assign(pair, alpha, split, seed)
    full = expand(pair, alpha, a)
    budget = min(full.nnz(), max(0, round(budget_ratio * pair.nnz())))
    out = widen(pair, alpha, a, budget)

    # exact budget, and weights vanish outside the masks
    assert out.nnz() == budget
    for w, m in zip([*out.w_in, out.w_out], [*out.m_in, out.m_out]):
        assert not bool(w[~m].any())

    for w0, m0, w1, m1, e1 in zip(pair.w_in, pair.m_in, out.w_in, out.m_in, full.m_in):
        kids = m1.view(h, alpha, d)
        # children disjoint and inside the parent's support
        assert int(kids.sum(1).max()) <= 1
        assert not bool((kids & ~m0.unsqueeze(1)).any())
        # before pruning, children cover the parent exactly
        assert torch.equal(e1.view(h, alpha, d).any(1), m0)
        # surviving values equal the parent's
        vals = w1.view(h, alpha, d)
        parent = w0.unsqueeze(1).expand_as(vals)
        assert torch.equal(vals[kids], parent[kids])

    # outgoing columns are copies or zeros, elementwise
    cols = out.w_out.view(-1, h, alpha)
    parent = pair.w_out.unsqueeze(2).expand_as(cols)
    assert bool(((cols == parent) | (cols == 0)).all())

    # child biases sum to the parent's
    for b0, b1 in zip(pair.b_in, out.b_in):
        if b0 is not None:
            torch.testing.assert_close(b1.view(h, alpha).sum(1), b0)

    # same seed, same output
    again = widen(pair, alpha, assign(pair, alpha, split, seed), budget)
    for x, y in zip([*out.w_in, out.w_out], [*again.w_in, again.w_out]):
        assert torch.equal(x, y)


@given(st.integers(1, 10), st.integers(2, 30), st.integers(2, 5), st.integers(0, 999), st.floats(0.2, 1.0))
def test_random_split_is_balanced(h, d, alpha, seed, density):
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(h, d, generator=g) < density
    a = random_assignment(support, alpha, g)
    for i in range(h):
        sizes = torch.bincount(a[i][support[i]].long(), minlength=alpha)
        assert int(sizes.max() - sizes.min()) <= 1


@given(st.integers(1, 8), st.integers(2, 4), st.integers(0, 999))
def test_clause_split_keeps_clauses_together(h, alpha, seed):
    d = 24
    g = torch.Generator().manual_seed(seed)
    clauses = [[0, 1, 2], [3, 4, 5], [5, 6, 7], [10, 11], [20, 21, 22, 23]]
    support = torch.ones(h, d, dtype=torch.bool)
    a = group_assignment(support, alpha, clauses, g)
    for i in range(h):
        for clause in ([0, 1, 2], [3, 4, 5], [6, 7], [10, 11], [20, 21, 22, 23]):  # 5 is owned by its first clause
            assert len(set(a[i, clause].tolist())) == 1


def test_clause_groups_spread_evenly():
    support = torch.ones(50, 32, dtype=torch.bool)
    clauses = [list(range(4 * k, 4 * k + 4)) for k in range(8)]
    a = group_assignment(support, 2, clauses, torch.Generator().manual_seed(0))
    sizes = torch.stack([(a == c).sum(1) for c in range(2)], 1)
    assert torch.equal(sizes, torch.full((50, 2), 16))
    # different neurons get different spreads
    assert len({tuple(row.tolist()) for row in a}) > 1


def test_reference_prune_removes_the_earliest_ties():
    w = [torch.ones(2, 3), torch.ones(3, 2)]
    m = [torch.ones(2, 3, dtype=torch.bool), torch.ones(3, 2, dtype=torch.bool)]
    out = reference.prune(w, m, 8)
    assert out[0].view(-1).tolist() == [False, False, False, False, True, True]
    assert bool(out[1].all())
    w = [torch.tensor([[0.1, -5.0, 0.3]]), torch.tensor([[2.0], [-0.2]])]
    m = [torch.ones(1, 3, dtype=torch.bool), torch.ones(2, 1, dtype=torch.bool)]
    out = reference.prune(w, m, 2)
    assert out[0].tolist() == [[False, True, False]] and out[1].view(-1).tolist() == [True, False]


@given(
    st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(1, 6),
    st.integers(0, 999),
    st.floats(0.0, 1.0),
    st.booleans(),
)
def test_radix_select_matches_a_stable_sort(dtype, h, d, o, seed, keep_ratio, coarse):
    """α=1 (magnitude pruning): the radix-select threshold and the tie rule equal a stable sort, in every float
    dtype, with many exact ties when values are coarse."""
    g = torch.Generator().manual_seed(seed)
    ws, ms = [], []
    for r, c in ((h, d), (o, h)):
        w = torch.randn(r, c, generator=g)
        if coarse:
            w = torch.round(w * 2) / 2
        m = torch.rand(r, c, generator=g) < 0.8
        ws.append((w * m).to(dtype))
        ms.append(m)
    pair = Pair([ws[0]], [ms[0]], [None], ws[1], ms[1])
    widen(pair, 1, torch.zeros(h, d, dtype=torch.int8), round(keep_ratio * pair.nnz()))


@given(pairs(), st.floats(0.3, 1.0))
def test_grouped_outgoing_and_shared_split(case, budget_ratio):
    pair, alpha, _, seed = case
    h, d = pair.w_in[0].shape
    a = shared_assignment(pair.support(), alpha, torch.Generator().manual_seed(seed))
    assert bool((a == a[0]).all())  # one partition for the whole layer
    sizes = torch.bincount(a[0].long(), minlength=alpha)
    assert int(sizes.max() - sizes.min()) <= 1
    # budget "same" keeps everything: incoming split disjointly, outgoing kept once per (output, parent)
    out = widen(pair, alpha, a, pair.nnz(), outgoing="grouped")
    assert out.nnz() == pair.nnz()
    for m0, m1 in zip(pair.m_in, out.m_in):
        assert torch.equal(m1.view(h, alpha, d).any(1), m0)
    cols = out.w_out.view(-1, h, alpha)
    r = torch.arange(cols.shape[0]).view(-1, 1, 1) % alpha
    c = torch.arange(alpha).view(1, 1, alpha)
    assert not bool(cols[(c != r).expand_as(cols)].any())  # only child r mod α is read by output r
    kept = cols.gather(2, r.expand(-1, h, 1)).squeeze(2)
    assert torch.equal(kept, pair.w_out)
    # and a smaller budget is still exact and keeps the pattern
    budget = round(budget_ratio * pair.nnz())
    small = widen(pair, alpha, a, budget, outgoing="grouped")
    assert small.nnz() == budget
    assert not bool(small.w_out.view(-1, h, alpha)[(c != r).expand_as(cols)].any())


@given(pairs(), st.floats(0.3, 1.0), st.integers(1, 4))
def test_tied_outgoing_and_grouped_split(case, budget_ratio, groups):
    """Tied outgoing: one weight per (output, parent), its copies equal and pruned together; the outgoing matrix
    counts once, so at budget `same` nothing is pruned. grouped:G: G input partitions, one per neuron group."""
    from fpewiden.fpe.splits import grouped_assignment, neuron_groups

    pair, alpha, _, seed = case
    h = pair.w_in[0].shape[0]
    a = grouped_assignment(pair.support(), alpha, groups, torch.Generator().manual_seed(seed))
    g = neuron_groups(h, min(groups, h))
    assert all(bool((a[g == k] == a[g == k][0]).all()) for k in g.unique())
    same = widen(pair, alpha, a, pair.nnz(), outgoing="tied")
    assert torch.equal(same.m_out, pair.m_out.repeat_interleave(alpha, dim=1))  # nothing pruned
    assert torch.equal(same.w_out, pair.w_out.repeat_interleave(alpha, dim=1))
    small = widen(pair, alpha, a, round(budget_ratio * pair.nnz()), outgoing="tied")
    copies = small.m_out.view(-1, h, alpha)
    assert bool((copies == copies[:, :, :1]).all())  # a parent's copies share one decision
    kept = sum(int(m.sum()) for m in small.m_in) + int(small.m_out.sum()) // alpha
    assert kept == round(budget_ratio * pair.nnz())


@given(pairs(), st.floats(0.0, 1.0), st.floats(0.5, 1.0))
def test_overlap_control(case, overlap, budget_ratio):
    """With overlap, children may share inputs (the paper's control); the budget stays exact."""
    from fpewiden.fpe.splits import overlap_children

    pair, alpha, _, seed = case
    h, d = pair.w_in[0].shape
    g = torch.Generator().manual_seed(seed)
    a = random_assignment(pair.support(), alpha, g)
    second = overlap_children(a, pair.support(), alpha, overlap, g)
    assert bool(((second == -1) | (second != a)).all())  # a second child is another child
    budget = round(budget_ratio * pair.nnz())
    out = widen(pair, alpha, a, budget, second=second)
    assert out.nnz() == budget
    for w0, m0, w1, m1 in zip(pair.w_in, pair.m_in, out.w_in, out.m_in):
        kids = m1.view(h, alpha, d)
        assert not bool((kids & ~m0.unsqueeze(1)).any())  # still inside the parent's support
        assert int(kids.sum(1).max()) <= 2  # an input reaches at most two children
        vals = w1.view(h, alpha, d)
        assert torch.equal(vals[kids], w0.unsqueeze(1).expand_as(vals)[kids])  # values unchanged
    if overlap == 0.0:
        assert bool((second == -1).all())
