"""bench/gpu_check.sh, the prepared GPU check, stays runnable: its CPU twin runs here (CI has no GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_cpu_twin_runs_and_reports(tmp_path):
    res = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", "--only", "finetune,packed"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable},
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and list(report["checks"]) == ["finetune", "packed"]
    assert report["checks"]["finetune"]["ok"] and "masks kept" in report["checks"]["finetune"]["note"]
    assert report["checks"]["packed"]["ok"], report["checks"]["packed"]["note"]  # Triton, interpreted: exact
    assert "ok   finetune" in (tmp_path / "gpu_check.log").read_text()


def test_gpu_check_refuses_without_cuda_and_says_so():
    import torch

    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        pytest.skip("a CUDA device is present: the check would run")
    res = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--only", "finetune"], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 1 and "no CUDA device: run with --dry-run" in res.stderr
