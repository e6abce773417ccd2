"""Intervals and the "not distinguishable" rule: seeds in `fpewiden run`, held-out samples on bench's front."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpewiden import significance as sig
from fpewiden.benchmark import report
from fpewiden.run import _summarise, difference_cell


def test_t_interval_matches_the_textbook():
    m, lo, hi = sig.mean_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: 2 ± 4.303/√3
    assert m == 2.0 and hi - m == pytest.approx(4.303 / 3**0.5) and m - lo == pytest.approx(hi - m)
    assert sig.mean_interval([0.5]) is None  # one seed: no interval exists


@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=2, max_size=20))
def test_the_interval_holds_the_mean(values):
    m, lo, hi = sig.mean_interval(values)
    assert lo - 1e-12 <= m <= hi + 1e-12 and m == pytest.approx(statistics.fmean(values))


def test_paired_differences_say_when_they_cannot_tell():
    a = {0: 0.9292, 1: 0.9310, 2: 0.9301}  # the FPE α=2 against dense, 0.0003 apart
    b = {0: 0.9300, 1: 0.9305, 2: 0.9314}
    d = sig.paired(a, b)
    assert not d["distinguishable"] and sig.difference_text(d).startswith("not distinguishable (")
    far = sig.paired({0: 0.97, 1: 0.98, 2: 0.99}, {0: 0.40, 1: 0.41, 2: 0.39})
    assert (
        far["distinguishable"] and sig.difference_text(far) == "+0.5800 [+0.5370, +0.6230]"
    )  # diffs .57 .57 .60: sd .0173, ±4.303·sd/√3
    assert sig.paired({0: 1.0}, {0: 0.5}) is None


@given(st.floats(0, 1), st.integers(1, 100_000))
def test_wilson_interval_holds_the_share_and_stays_in_0_1(p, n):
    lo, hi = sig.proportion_interval(p, n)
    assert 0.0 <= lo <= p + 1e-12 and p - 1e-12 <= hi <= 1.0


def test_run_summary_pairs_each_model_with_dense_by_seed():
    rows = [
        {"model": m, "seed": s, "neurons": 8, "nnz": 384, "final": {"exact_match": v}, "initial": {}}
        for m, vals in {"dense": [0.40, 0.41, 0.39], "FPE": [0.97, 0.98, 0.99], "twin": [0.41, 0.40, 0.40]}.items()
        for s, v in enumerate(vals)
    ]
    dense, fpe, twin = _summarise(rows)
    assert "vs_dense" not in dense
    assert fpe["vs_dense"]["distinguishable"] and fpe["vs_dense"]["seeds"] == 3
    assert difference_cell(twin).startswith("not distinguishable")
    assert fpe["exact_match"]["ci95"][0] < 0.98 < fpe["exact_match"]["ci95"][1]


def test_the_front_runs_only_through_steps_beyond_their_intervals():
    def row(name, nbytes, acc, n=300):
        return {"model": name, "best_bytes": nbytes, "metrics": {"accuracy": acc}, "metric_samples": {"accuracy": n}}

    rows = [row("dense", 1632, 0.9307), row("α=2", 1664, 0.9313), row("α=4", 1696, 0.9340), row("big", 4000, 0.99)]
    assert report.front(rows, "accuracy") == [0, 3]  # 0.9313 and 0.9340 are within a few samples of 0.9307
    for r in rows:
        del r["metric_samples"]  # no sample count known: the ordinary front
    assert report.front(rows, "accuracy") == [0, 1, 2, 3]
