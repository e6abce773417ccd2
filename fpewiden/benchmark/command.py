"""`fpewiden bench` (not --sweep) from its options: every option and output checked, then the models from their
headers (MLPs or Hugging Face models, not both), and only then data loaded and models measured, so a bad input
never costs minutes of work."""

from __future__ import annotations

from pathlib import Path

import torch

from fpewiden.benchmark.outputs import write
from fpewiden.benchmark.plot import check_plot_path
from fpewiden.benchmark.report import CONSOLE_WIDTH, console_table
from fpewiden.console import console, status_lines
from fpewiden.data.specs import data_file
from fpewiden.devices import resolve_device
from fpewiden.errors import FpewidenError
from fpewiden.io.outputs import check_outputs
from fpewiden.io.provenance import Provenance, digest

ENGINES = ("torch", "ort", "packed", "ort-packed", "ort-int8", "ort-int4", "torch-int8")


def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise FpewidenError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise FpewidenError(f"{flag} {text!r}: every value must be at least 1")
    return values


def model_kind(path: Path) -> str:
    """'mlp' or 'hf', from headers only (safetensors header, config.json, the ONNX graph's inputs)."""
    from fpewiden.arch import find_pairs
    from fpewiden.io.checkpoint import open_checkpoint

    if not path.exists():
        raise FpewidenError(f"no such model: {path}")
    if path.suffix == ".onnx":
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and onnx's own errors on arbitrary bytes
            raise FpewidenError(f"{path} is not a readable ONNX model ({type(e).__name__})") from None
        inputs = [i.name for i in proto.graph.input]
        if inputs == ["x"]:
            return "mlp"
        if "input_ids" in inputs:
            return "hf"
        raise FpewidenError(f"{path} takes inputs {inputs}: neither an MLP (x) nor a language model (input_ids)")
    from fpewiden.packed.reader import is_packed, read_packed

    if is_packed(path):
        return read_packed(path).kind
    ck = open_checkpoint(path)
    find_pairs(ck)
    return ck.kind


def bench_command(
    models: list[Path],
    data: str | None,
    batch_sizes: str,
    engines: str,
    device: str,
    repeat: int,
    warmup: int,
    threads: int,
    seed: int,
    json_out: Path | None,
    markdown: Path | None,
    plot: Path | None,
    force: bool,
    seq_lens: str = "32,128",
    reference: Path | None = None,
    tokenizer: Path | None = None,
) -> list[dict]:
    if data is None:
        raise FpewidenError("--data is required (a DATA spec such as dnf:clauses=16 or digits, or text for HF models)")
    engine_list = [e.strip() for e in engines.split(",") if e.strip()]
    bad = [e for e in engine_list if e not in ENGINES]
    if bad or not engine_list:
        raise FpewidenError(f"--engines: unknown engine {bad[0] if bad else ''!r}; choose from {', '.join(ENGINES)}")
    sizes = _ints("--batch-sizes", batch_sizes)
    lens = _ints("--seq-len", seq_lens)
    if repeat < 0 or warmup < 0 or threads < 1:
        raise FpewidenError("--threads must be at least 1, --repeat and --warmup not negative (--repeat 0: auto)")
    if plot is not None:
        check_plot_path(plot)
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FpewidenError("--plot needs matplotlib: pip install 'fpewiden[plot]'") from None
    paths = list(models)
    if reference is not None:
        paths = [reference, *[p for p in paths if p.resolve() != reference.resolve()]]
    if not paths:
        raise FpewidenError("bench needs at least one model")
    outputs = [p for p in (json_out, markdown, plot) if p is not None]
    data_inputs = [p] if (p := data_file(data)) is not None else []
    provenance = Provenance("bench", lambda: digest([*(data_inputs or [data]), *paths]))
    read = [*paths, *data_inputs, *([tokenizer] if tokenizer else [])]
    check_outputs(outputs, read, force, what="output path", provenance=provenance)
    _refuse_packed_exports(paths)  # before any model is loaded: a refusal costs nothing
    kinds = {model_kind(p) for p in paths}
    if len(kinds) > 1:
        raise FpewidenError("bench compares MLPs with MLPs and language models with language models, not both")
    dev = resolve_device(device)
    torch.set_num_threads(threads)
    extra: dict = {"batch_sizes": sizes, "engines": engine_list, "repeat": repeat, "warmup": warmup, "threads": threads}
    say = status_lines("bench")
    if kinds == {"mlp"}:
        from fpewiden.benchmark.mlp import bench
        from fpewiden.data.specs import load_data

        dataset = load_data(data, seed)
        rows = bench(paths, dataset, sizes, engine_list, dev, repeat, warmup, threads, say)
    else:
        from fpewiden.benchmark.hf import bench
        from fpewiden.benchmark.hf_eval import load_eval

        dataset = load_eval(data, seed)
        rows = bench(paths, dataset, sizes, lens, engine_list, dev, repeat, warmup, threads, tokenizer, say)
        extra["seq_lens"] = lens
    console(CONSOLE_WIDTH).print(console_table(rows))
    write(rows, json_out, markdown, plot, provenance, {"data": dataset.describe(), **extra})
    return rows


def _refuse_packed_exports(paths: list[Path]) -> None:
    """Every .onnx given checked for fpewiden's packed op from its graph alone (weights left on disk), so a packed
    export is refused in one line before minutes of loading the models before it."""
    onnx_files = [p for p in paths if p.suffix == ".onnx" and p.is_file()]
    if not onnx_files:
        return
    import onnx

    from fpewiden.benchmark.measure import refuse_packed_onnx

    for p in onnx_files:
        try:
            graph = onnx.load(str(p), load_external_data=False)
        except Exception:  # onnx raises its own types; loading the model later says what is wrong
            continue
        refuse_packed_onnx(p, graph)
