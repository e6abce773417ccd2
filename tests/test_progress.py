"""Long work is never silent where stderr is not a terminal (a log file, CI, nohup): plain lines instead of a bar
that draws nothing there, at most every PERIOD seconds, on completion, and a heartbeat during one long step."""

import time

from typer.testing import CliRunner

from fpewiden.cli import app
from fpewiden.console import LoggedProgress, bytes_bar
from tests.helpers import write_mlp


def test_plain_lines_throttled_completed_and_a_heartbeat(capsys, monkeypatch):
    monkeypatch.setattr(LoggedProgress, "PERIOD", 0.2)
    monkeypatch.setattr(LoggedProgress, "HEARTBEAT", 1.0)
    with bytes_bar() as bar:  # pytest's captured stderr is no terminal
        task = bar.add_task("converting", total=4e6)
        for i in range(1, 4):  # three updates in a burst: one line (the first), the rest throttled
            bar.update(task, completed=i * 1e6, description=f"converted layer {i}")
        time.sleep(3.0)  # one long step: the heartbeat speaks (it looks once a second)
        bar.update(task, completed=4e6, description="converted layer 4")  # done: always said
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("converted layer 1: 1.0 MB of 4.0 MB, 0 s, about ")
    assert any(line.startswith("converted layer 3: still at work, ") for line in lines[1:-1])
    assert lines[-1].startswith("converted layer 4: 4.0 MB of 4.0 MB, ")
    assert not any("layer 2" in line for line in lines)


def test_export_says_it_is_at_work_in_a_log(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 16, 3))
    res = CliRunner().invoke(app, ["export", str(src), "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()  # a long export also says "still at work" every HEARTBEAT seconds
    assert lines and lines[-1].startswith("exported m.onnx: 1 of 1, ")


def test_convert_says_its_progress_in_a_log(tmp_path):
    src = write_mlp(tmp_path / "m.safetensors", widths=(12, 16, 3))
    res = CliRunner().invoke(app, ["convert", str(src), "--out", str(tmp_path / "o.safetensors")])
    assert res.exit_code == 0, res.output
    assert any(" kB of " in line and line.startswith("converted ") for line in res.stderr.splitlines())
