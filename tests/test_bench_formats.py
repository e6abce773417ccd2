"""Byte counts on hand-built matrices, and the Pareto front."""

import torch

from fpewiden.benchmark.formats import best_format, block_bytes, matrix_bytes, model_bytes, pareto_front


def test_matrix_bytes_by_hand():
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = mask[2, 9] = True  # 3 non-zeros in a 4x10 matrix
    b = matrix_bytes(mask)
    assert b["dense_fp32"] == 160 and b["dense_fp16"] == 80 and b["dense_bf16"] == 80
    assert b["csr_idx32"] == 3 * 8 + 5 * 4  # values+cols, row pointers
    assert b["csr_idx16"] == 3 * 6 + 5 * 4
    assert b["bitmask"] == 3 * 4 + 5  # 40 bits
    assert b["block"] is None


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
    blocks = model_bytes({"a": dense, "b": half}, vectors=0, blocks=[("a", "b", 2)])
    assert blocks["block"] == block_bytes((8, 16), (16, 8), 2) == (8 * 8 + 16 * 4) * 4 + (16 + 16) * 4


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
