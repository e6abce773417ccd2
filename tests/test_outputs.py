"""Outputs never destroy what a user owns; fpewiden's own outputs are replaced freely; stages of killed runs are
cleaned up; outputs get the user's umask; a full disk is one line and leaves nothing behind."""

import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.io.atomic import remove_stale
from fpewiden.io.outputs import written_by_fpewiden
from tests.helpers import tiny_bert, write_mlp

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_hf_convert_refuses_a_user_output_and_force_replaces_it(tmp_path, kind):
    src = tiny_bert(tmp_path / "bert")
    dst = tmp_path / "target"
    if kind == "folder":
        dst.mkdir()
        (dst / "thesis.tex").write_text("years of work\n")
    else:
        dst.write_text("a file of mine\n")
    before = tree(tmp_path)
    res = cli("convert", src, "--out", dst)
    assert res.exit_code == 2 and "fpewiden did not write; pass --force" in res.stderr, res.output
    assert tree(tmp_path) == before
    res = cli("convert", src, "--out", dst, "--force")
    assert res.exit_code == 0, res.output
    assert (dst / "config.json").is_file() and not (dst / "thesis.tex").exists()
    assert written_by_fpewiden(dst)
    res = cli("convert", src, "--out", dst, "--seed", "3")  # its own output: replaced without --force
    assert res.exit_code == 0, res.output


def test_finetune_hf_refuses_a_user_folder(tmp_path):
    src = tiny_bert(tmp_path / "bert")
    text = tmp_path / "s.txt"
    text.write_text("\n".join(f"what is the city {i}" for i in range(20)))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.txt").write_text("mine\n")
    before = tree(tmp_path)
    res = cli("finetune", src, "--teacher", src, "--data", text, "--out", tmp_path / "mine", "--epochs", "1")
    assert res.exit_code == 2 and "pass --force" in res.stderr
    assert tree(tmp_path) == before


def test_own_outputs_are_replaced_without_force(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(16, 8, 6))
    for _ in range(2):
        assert cli("convert", src, "--out", tmp_path / "c.safetensors").exit_code == 0
        res = cli(
            "finetune",
            tmp_path / "c.safetensors",
            "--data",
            "dnf:inputs=16,clauses=6,n=300",
            "--out",
            tmp_path / "f.safetensors",
            "--epochs",
            "1",
        )
        assert res.exit_code == 0, res.output
        res = cli("export", tmp_path / "f.safetensors", "--out", tmp_path / "f.onnx")
        assert res.exit_code == 0, res.output
        res = cli(
            "bench",
            src,
            tmp_path / "f.safetensors",
            "--data",
            "dnf:inputs=16,clauses=6,n=300",
            "--repeat",
            "2",
            "--warmup",
            "0",
            "--batch-sizes",
            "1",
            "--json",
            tmp_path / "b.json",
            "--markdown",
            tmp_path / "b.md",
            "--plot",
            tmp_path / "b.png",
        )
        assert res.exit_code == 0, res.output
    for name in ("c.safetensors", "f.safetensors", "f.onnx", "b.json", "b.md", "b.png", "f.safetensors.log.json"):
        assert written_by_fpewiden(tmp_path / name), name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_recognises_only_its_own_files(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"results": 1}))
    (tmp_path / "a.md").write_text("# notes\n")
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    (tmp_path / "a.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    (tmp_path / "d").mkdir()
    for p in tmp_path.iterdir():
        assert not written_by_fpewiden(p), p


def test_stale_stages_of_dead_writers_are_removed(tmp_path):
    dst = tmp_path / "out.safetensors"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        stale = tmp_path / f".out.safetensors.{dead.pid}.abc123.tmp"
        stale.mkdir()
        (stale / "out.safetensors").write_bytes(b"x" * 1000)
        busy = tmp_path / f".out.safetensors.{live.pid}.def456.tmp"
        busy.mkdir()
        other = tmp_path / f".other.safetensors.{dead.pid}.abc123.tmp"
        other.mkdir()
        src = write_mlp(tmp_path / "m.safetensors")
        assert cli("convert", src, "--out", dst).exit_code == 0
        assert not stale.exists()  # its writer is gone
        assert busy.exists()  # its writer still runs
        assert other.exists()  # another destination's stage is not ours to judge
    finally:
        live.kill()
        live.wait()
    assert remove_stale(dst) == [busy]


def test_outputs_follow_the_umask(tmp_path):
    src = tiny_bert(tmp_path / "bert")
    mlp = write_mlp(tmp_path / "m.safetensors")
    old = os.umask(0o027)
    try:
        assert cli("convert", src, "--out", tmp_path / "hf").exit_code == 0
        assert cli("convert", mlp, "--out", tmp_path / "c.safetensors").exit_code == 0
        res = cli(
            "run", "polysemantic", "--out", tmp_path / "run", "--seeds", "0", "--epochs", "2", "--warmup-epochs", "1"
        )
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    modes = {
        p: stat.S_IMODE(p.stat().st_mode)
        for p in [
            tmp_path / "hf",
            *(tmp_path / "hf").iterdir(),
            tmp_path / "c.safetensors",
            tmp_path / "run",
            *(tmp_path / "run").rglob("*"),
        ]
    }
    for p, mode in modes.items():
        assert mode == (0o750 if p.is_dir() else 0o640), (p, oct(mode))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs: a real ENOSPC. Needs root (mount); skipped elsewhere."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mnt
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, tiny_disk):
    big = write_mlp(tmp_path / "big.safetensors", widths=(256, 512, 10))  # ~550 KB, > the 256 KiB disk
    res = cli("convert", big, "--out", tiny_disk / "o.safetensors")
    assert res.exit_code == 2, res.output
    assert (
        res.stderr
        == f"error: cannot write {tiny_disk / 'o.safetensors'}: No space left on device; nothing was written\n"
    )
    assert list(tiny_disk.iterdir()) == []
    data = "dnf:inputs=256,clauses=10,n=200"
    res = cli("finetune", big, "--data", data, "--out", tiny_disk / "f.safetensors", "--epochs", "1")
    assert res.exit_code == 2 and "No space left on device" in res.stderr, res.output
    assert list(tiny_disk.iterdir()) == []
    hf = tiny_bert(tmp_path / "bert")
    (hf / "padding.bin").write_bytes(b"\0" * 300_000)  # copied along with the model: past the disk's size
    res = cli("convert", hf, "--out", tiny_disk / "hf")
    assert res.exit_code == 2 and "No space left on device" in res.stderr, res.output
    assert list(tiny_disk.iterdir()) == []


def test_the_quickstart_writes_into_a_folder_a_fresh_clone_lacks(tmp_path, monkeypatch):
    """README: `fpewiden run polysemantic --out runs/polysemantic` in a fresh clone, which has no runs/."""
    monkeypatch.chdir(tmp_path)
    res = cli(
        "run", "polysemantic", "--out", "runs/polysemantic", "--seeds", "0", "--epochs", "2", "--warmup-epochs", "1"
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "runs" / "polysemantic" / "results.md").is_file()
    (tmp_path / "file").write_text("mine")
    res = cli("convert", write_mlp(tmp_path / "m.safetensors"), "--out", tmp_path / "file" / "x" / "c.safetensors")
    assert res.exit_code == 2 and "cannot create folder" in res.stderr
    assert (tmp_path / "file").read_text() == "mine"
