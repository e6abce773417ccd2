"""The `fpewiden` command line: parse, call, print. Heavy imports happen inside commands so --help is instant.

shell.py holds the app and what every command shares (one-line errors, usage lines, --force); each command
module registers its commands on import, in the order --help lists them.
"""

import importlib

from fpewiden.cli.shell import app, main

for _module in ("convert", "checkpoints", "training", "deploy"):  # the order --help lists the commands in
    importlib.import_module(f"fpewiden.cli.{_module}")

__all__ = ["app", "main"]
