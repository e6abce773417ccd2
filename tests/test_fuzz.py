"""The kernels' fuzz harnesses (fpewiden/packed/fuzz.py), built with libFuzzer, ASan and UBSan, replay the corpus
the last campaign committed (tests/fuzz_corpus, bench/fuzz_kernels.py) and make a few thousand fresh runs: a
sanitizer report or a kernel that disagrees with the reference fails the test. Skipped, in one line, where there
is no clang with libFuzzer (.ci/run installs it, so CI always runs it)."""

from pathlib import Path

import pytest

from fpewiden.packed import fuzz

CORPUS = Path(__file__).with_name("fuzz_corpus")


def _why_not() -> str | None:
    try:
        fuzz.clang()
    except RuntimeError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def harnesses() -> dict[str, Path]:
    why = _why_not()
    if why is not None:
        pytest.skip(f"fuzz harnesses not built: {why}")
    return fuzz.build()  # set-up --dev built them already; a changed source rebuilds here


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_the_committed_corpus_and_fresh_runs_find_nothing(harnesses, target, tmp_path):
    corpus = CORPUS / f"{target}.zip"
    assert corpus.is_file(), f"no committed corpus for {target}: run bench/fuzz_kernels.py"
    res = fuzz.replay(target, corpus, tmp_path, runs=3000)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Done" in res.stderr and "ERROR" not in res.stderr
    assert len(list((tmp_path / "corpus").iterdir())) > 50  # a real corpus was replayed, not an empty folder
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("crash-", "leak-", "timeout-", "oom-"))]
