"""Packed models end to end: what a deployment engineer runs, against the same model dense, in one process.

MiniLM (token batches): the original, its FFNs magnitude-pruned to half (`convert --alpha 1 --budget 0.5`) run
densely by transformers (= unpack-and-dense), and the same packed (`fpewiden pack`, `fpewiden.packed.load`);
forward latency at batch × 128 tokens.

A Llama-shaped decoder (decode): TinyLlama-1.1B's widths (hidden 2048, FFN 5632, 32 heads, 4 KV heads) with
`--layers` layers and random weights, built offline; the original, its FFNs pruned to half, and FPE α=2 at the
original count (random split, copied outgoing), dense and packed; greedy decoding with the KV cache at batch 1:
tokens per second, against the byte bound (the linear layers' dense bytes over their packed bytes).

  python bench/packed_models.py [--threads 1,2 --layers 4 --out bench/results/packed_models]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.data.embeddings import minilm_dir
from fpewiden.io.provenance import MD_MARKER, json_document
from fpewiden.model.loaded import load_model
from fpewiden.packed import kernels, load
from fpewiden.packed.pack import pack_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from packed import cpu_name, timed


def linear_bytes(model: torch.nn.Module) -> int:
    """Weight bytes the model's Linear (and packed) layers read per token: packed arrays as stored, torch's dynamic
    int8 weights (a byte each, a scale and zero point), fp32 Linear weights."""
    from fpewiden.packed.ops import PackedLinear

    total = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            total += m.nbytes
        elif isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            total += m.in_features * m.out_features + 8
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def minilm_rows(work: Path, threads: int, batches: list[int]) -> list[dict]:
    src = minilm_dir()
    half = work / "minilm-half"
    if not half.exists():
        convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
        pack_checkpoint(half, work / "minilm-half-packed")
    original = load_model(src).model.eval()
    dense_half = load_model(half).model.eval()
    packed = load(work / "minilm-half-packed").eval()
    rows = []
    for b in batches:
        ids = torch.randint(1000, 20000, (b, 128), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)

        def run(m, ids=ids, mask=mask):
            with torch.inference_mode():
                m(input_ids=ids, attention_mask=mask)

        res = timed({"original": lambda: run(original), "pruned, dense": lambda: run(dense_half),
                     "pruned, packed": lambda: run(packed)}, 4.0)  # fmt: skip
        base = res["original"]["median_ms"]
        row = {"model": "MiniLM, FFNs 50%", "batch": b, "tokens": 128, "threads": threads, "timings": res,
               "ratio": {k: v["median_ms"] / base for k, v in res.items()},
               "bytes": {"original": linear_bytes(original), "packed": linear_bytes(packed)}}  # fmt: skip
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "timings"}), flush=True)
    return rows


def llama(work: Path, layers: int) -> Path:
    """TinyLlama's widths, random weights (bf16 storage as released; run in fp32)."""
    import transformers

    path = work / "llama"
    if path.exists():
        return path
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                   num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                   max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(str(path))
    return path


def decode_rows(work: Path, threads: int, layers: int, tokens: int) -> list[dict]:
    src = llama(work, layers)
    variants = {
        "FFNs 50%": ConvertOptions(alpha=1, budget=Budget.parse("0.5")),
        "FPE α=2 same": ConvertOptions(alpha=2),
    }
    models = {"original, dense": load_model(src, head=True).model.eval()}
    for name, opts in variants.items():
        out = work / name.replace(" ", "_").replace("%", "").replace("=", "")
        if not out.exists():
            convert(src, out, opts)
            pack_checkpoint(out, out.with_name(out.name + "-packed"))
        models[f"{name}, dense"] = load_model(out, head=True).model.eval()
        models[f"{name}, packed"] = load(out.with_name(out.name + "-packed")).eval()
    prompt = torch.randint(100, 30000, (1, 16), generator=torch.Generator().manual_seed(0))

    def gen(m):
        with torch.inference_mode():
            m.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    res = timed({k: (lambda m=m: gen(m)) for k, m in models.items()}, 20.0, min_rounds=5, max_rounds=15)
    dense_bytes = linear_bytes(models["original, dense"])
    rows = []
    for k, m in models.items():
        tps = tokens / (res[k]["median_ms"] / 1e3)
        base = tokens / (res["original, dense"]["median_ms"] / 1e3)
        row = {"model": f"Llama-shaped, {layers} layers: {k}", "threads": threads, "tokens_per_sec": tps,
               "vs_original": tps / base, "linear_bytes": linear_bytes(m), "byte_bound": dense_bytes / linear_bytes(m),
               "timing": res[k]}  # fmt: skip
        row["share_of_bound"] = row["vs_original"] / row["byte_bound"]
        rows.append(row)
        print(json.dumps({k2: v for k2, v in row.items() if k2 != "timing"}), flush=True)
    return rows


def markdown(minilm: list[dict], decode: list[dict], command: str) -> str:
    lines = [
        "# Packed models end to end",
        "",
        f"`{command}`",
        "",
        f"CPU: {cpu_name()}; kernels: {kernels.path()}; torch {torch.__version__}; medians of interleaved rounds.",
        "",
        "## MiniLM, FFNs magnitude-pruned to 50%, forward of batch × 128 tokens (ratio to the original)",
        "",
        "| threads | batch × tokens | original ms | pruned, dense (unpack-and-dense) | pruned, packed | "
        "linear bytes packed / original |",
        "|---|---|---|---|---|---|",
    ]
    for r in minilm:
        t = r["timings"]
        lines.append(
            f"| {r['threads']} | {r['batch']} × {r['tokens']} | {t['original']['median_ms']:.2f} | "
            f"{r['ratio']['pruned, dense']:.2f}× | **{r['ratio']['pruned, packed']:.2f}×** | "
            f"{r['bytes']['packed'] / r['bytes']['original']:.3f} |"
        )
    lines += [
        "",
        "## Llama-shaped decoder, greedy decoding at batch 1 (KV cache)",
        "",
        "| threads | model | tokens/s | vs original | byte bound | share of the bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in decode:
        lines.append(
            f"| {r['threads']} | {r['model']} | {r['tokens_per_sec']:.1f} | {r['vs_original']:.2f}× | "
            f"{r['byte_bound']:.2f}× | {r['share_of_bound']:.0%} |"
        )
    return "\n".join(lines) + f"\n\n{MD_MARKER}\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/results/packed_models"))
    args = ap.parse_args()
    minilm, decode = [], []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            minilm += minilm_rows(work, threads, [int(b) for b in args.batches.split(",")])
            decode += decode_rows(work, threads, args.layers, args.tokens)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = json_document({"command": command, "cpu": cpu_name(), "kernels": kernels.path(), "minilm": minilm,
                         "decode": decode})  # fmt: skip
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(minilm, decode, command))
    print(markdown(minilm, decode, command))


if __name__ == "__main__":
    main()
