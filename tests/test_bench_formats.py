"""Byte counts on hand-built matrices, and the Pareto front."""

import torch

from fpewiden.benchmark.formats import PairLayout, best_format, matrix_bytes, model_bytes, pareto_front
from fpewiden.export.fast import find_structure


def test_matrix_bytes_by_hand():
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = mask[2, 9] = True  # 3 non-zeros in a 4x10 matrix
    b = matrix_bytes(mask)
    assert b["dense_fp32"] == 160 and b["dense_fp16"] == 80 and b["dense_bf16"] == 80
    assert b["csr_idx32"] == 3 * 8 + 5 * 4  # values+cols, row pointers
    assert b["csr_idx16"] == 3 * 6 + 5 * 4
    assert b["bitmask"] == 3 * 4 + 5  # 40 bits
    assert b["block"] is None and b["parent"] is None


def test_csr16_needs_narrow_matrices():
    assert matrix_bytes(torch.ones(1, 70000, dtype=torch.bool))["csr_idx16"] is None


def test_model_bytes_and_best_format():
    dense = torch.ones(8, 16, dtype=torch.bool)
    half = torch.rand(16, 8, generator=torch.Generator().manual_seed(0)) < 0.1
    t = model_bytes({"a": dense, "b": half}, vectors=10)
    assert t["dense_fp32"] == (128 + 128) * 4 + 40
    nnz = int(half.sum())
    assert t["csr_idx16"] == (128 * 6 + 9 * 4) + (nnz * 6 + 17 * 4) + 40  # every matrix in the format
    assert best_format(t) in ("csr_idx16", "bitmask")
    assert t["block"] is None and t["parent"] is None  # no converted pair


def test_block_and_parent_bytes_of_a_shared_tied_pair():
    """4 parents × α=2 over 16 inputs, one shared partition (8 inputs per child), outgoing tied (6 × 4)."""
    child = torch.arange(16) % 2
    m_in = child.unsqueeze(0) == (torch.arange(8) % 2).unsqueeze(1)  # (8 children × 16): a partition per parent
    w_out = torch.randn(6, 4).repeat_interleave(2, dim=1)  # tied copies
    st = find_structure([m_in], w_out, 2, "tied", 1)
    masks = {"in": m_in, "out": torch.ones(6, 4, dtype=torch.bool)}  # the tied matrix at its deployed size
    t = model_bytes(masks, vectors=0, pairs=[PairLayout(("in",), "out", 2, st, True)])
    assert t["block"] == (2 * 8 * 4) * 4 + 16 * 4 + 6 * 4 * 4  # two 8×4 blocks + gather indices + W_out (6 × 4)
    assert t["parent"] == 4 * 16 * 4 + (4 * 16) // 8 + 6 * 4 * 4  # parent values + 1 bit per weight + W_out
    assert t["dense_fp32"] == (8 * 16 + 6 * 4) * 4  # the widened incoming matrix, stored densely


def test_the_parent_format_keeps_a_copied_outgoing_matrix_in_fp32():
    """An untied outgoing matrix counts at its smallest fp32-valued format, never at fp16's half bytes (which
    change the numbers computed): a dense pair converted at α=1 is then never smaller than its dense fp32 self."""
    masks = {"in": torch.ones(8, 32, dtype=torch.bool), "out": torch.ones(16, 8, dtype=torch.bool)}
    t = model_bytes(masks, vectors=24, pairs=[PairLayout(("in",), "out", 1, None, False)])
    assert t["parent"] == t["dense_fp32"] == (8 * 32 + 16 * 8) * 4 + 24 * 4
    half = {"in": masks["in"], "out": torch.arange(128).view(16, 8) % 2 == 0}  # outgoing at 50%: bitmask
    t = model_bytes(half, vectors=0, pairs=[PairLayout(("in",), "out", 2, None, False)])
    assert t["parent"] == 4 * 32 * 4 + (4 * 32) // 8 + (64 * 4 + 16)  # parents, 1 bit each, outgoing bitmask


def test_pareto_front():
    pts = [(100, 0.9), (50, 0.8), (50, 0.85), (200, 0.95), (120, 0.85), (10, 0.1), (200, 0.95)]
    # (50, 0.8) is dominated by (50, 0.85); (120, 0.85) by (100, 0.9); the duplicate (200, 0.95) points tie
    assert pareto_front(pts) == [5, 2, 0, 3, 6]


def test_2_4_pattern():
    from fpewiden.benchmark.formats import is_2_4
    from fpewiden.fpe.expand import grouped_outgoing

    assert is_2_4(grouped_outgoing(range(6), 16, 2))  # α=2 grouped outgoing: one of each parent's two children
    assert not is_2_4(torch.ones(2, 8, dtype=torch.bool))
    assert not is_2_4(torch.ones(2, 6, dtype=torch.bool))  # not a whole number of groups
    m = torch.zeros(1, 8, dtype=torch.bool)
    m[0, [0, 1, 5]] = True
    assert is_2_4(m)
    m[0, 2] = True
    assert not is_2_4(m)
