"""The shell every command shares: the Typer app, one-line errors (exit code 2), plain usage lines, --force."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

from fpewiden.errors import FpewidenError


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, missing value, bad type) as one `error:` line and exit code 2, like every
    other user error, instead of click's usage block or rich's framed box."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(130)
        except typer.TyperException as e:  # typer's (vendored) click usage errors all derive from it
            if type(e).__name__ == "NoArgsIsHelpError":
                e.show()  # type: ignore[attr-defined]
                sys.exit(2)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            typer.echo(f"error: {message}{hint}", err=True)
            sys.exit(2)
        code = rv if isinstance(rv, int) else 0
        if standalone_mode:
            sys.exit(code)
        return rv


class PlainUsage(TyperCommand):
    """Usage lines as users write them (`fpewiden convert [OPTIONS] SRC`), not typer's `{src}`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                name = (p.metavar or p.name or "").upper()
                name += "..." if p.nargs != 1 else ""
                pieces.append(name if p.required else f"[{name}]")
        return pieces


TOP_HELP = """Make a trained model smaller at a measured accuracy cost, run it at its non-zero bytes,
or widen it at the same non-zeros (Fixed Parameter Expansion, FPE: arXiv 2510.04500).
What each command gained and cost, measured: README.md's goal table and bench/results/.

\b
Smaller, for a pretrained model: calibrated pruning
  fpewiden convert MODEL --out small --alpha 1 --budget 0.5 --calibration text.txt
\b
Faster: store it packed and run it on fpewiden's kernels (one input at a time; token
batches are not faster)
  fpewiden pack small --out small-packed     (Python: fpewiden.packed.load("small-packed"))
  In ONNX Runtime: fpewiden export small-packed --out small.onnx --layout packed, then
  register fpewiden.packed.ort_library() in the session.
\b
Smallest weights: int8 (or 4-bit) values, every Linear and the embedding table
  fpewiden pack small --out small-i8 --dtype int8
  fpewiden convert MODEL --out small-i4 --alpha 1 --budget same --no-reconstruct \\
      --calibration text.txt --quantize int4 --packed     (GPTQ on your text)
\b
Wider at the same non-zeros (FPE), then train: pays on models trained after the
conversion; on a pretrained MiniLM it stays below calibrated pruning
  fpewiden convert MODEL --out wide --alpha 2 && fpewiden finetune wide --data DATA --out wide-ft
\b
Measure accuracy, bytes and latency side by side:
  fpewiden bench MODEL small wide --data embed:trec6 --engines torch,ort,packed --plot r.png
"""

app = typer.Typer(
    name="fpewiden",
    cls=OneLineErrors,
    rich_markup_mode=None,  # plain help: `--verify / --no-verify` and real defaults, no boxes
    help=TOP_HELP,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

F = TypeVar("F", bound=Callable[..., object])
FORCE = typer.Option(
    "--force",
    help="Replace an existing output even when it is not what this command would write again from the same "
    "input (a fine-tuned model, another command's output, a file fpewiden did not write).",
)


def _quiet_libraries() -> None:
    """No library chatter before our one line, and never the network: models and tokenizers come from disk."""
    warnings.simplefilter("ignore")
    logging.getLogger("torch").setLevel(logging.ERROR)  # torch.onnx logs optional-package notes as warnings
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)


def user_errors(fn: F) -> F:
    """Turn FpewidenError and OS errors (disk full, read-only, no permission) into one line on stderr and exit
    code 2: no traceback. Outputs are staged, so nothing half-written remains."""

    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> object:
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except FpewidenError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            typer.echo(f"error: {e.strerror or e}{where}; nothing was written", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted; nothing was written", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def main() -> None:
    app()
