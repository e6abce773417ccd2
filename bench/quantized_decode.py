"""Decode with int8 and 4-bit weights: fpewiden's packed models against torch's dynamic int8 (issue 31's decode
target).

A Llama-shaped decoder with TinyLlama-1.1B's widths (hidden 2048, FFN 5632, 32 heads, 4 KV heads, untied
embeddings), `--layers` layers, random weights, built offline (bench/packed_models.py's). Greedy decoding with the
KV cache at batch 1, one thread unless named, models interleaved round by round (bench/packed.py's timer):

  original, torch fp32            the dense model as transformers runs it
  original, torch int8            torch.ao.quantization.quantize_dynamic of its nn.Linear layers
  original, fpewiden int8         `pack --dtype int8` of the original (every Linear and the embedding table int8)
  FFNs 50%, fpewiden int8         `convert --alpha 1 --budget 0.5` (the FFNs at half their non-zeros), then
                                  `pack --dtype int8`
  FFNs 50%, torch int8            the same pruned model under torch's dynamic int8 (zeros stored densely)
  original / FFNs 50%, fpewiden int4   the same two, `pack --dtype int4` (a scale per 32 inputs; tables int8)

Issue 31's target: FFNs 50% + int8 ≥ 1.25× the tokens/s of the dense model under torch's dynamic int8.

  python bench/quantized_decode.py [--threads 1 --layers 4 --tokens 32 --out bench/results/quantized/decode]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

import torch

from fpewiden.benchmark.competitors import torch_int8
from fpewiden.convert import Budget, ConvertOptions, convert
from fpewiden.io.provenance import MD_MARKER, json_document
from fpewiden.model.loaded import load_model
from fpewiden.packed import kernels, load
from fpewiden.packed.pack import pack_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from packed import cpu_name, timed
from packed_models import linear_bytes, llama


def models(work: Path, layers: int) -> dict[str, torch.nn.Module]:
    src = llama(work, layers)
    half = work / "ffn50"
    convert(src, half, ConvertOptions(alpha=1, budget=Budget.parse("0.5")))
    pack_checkpoint(src, work / "original-i8", "int8")
    pack_checkpoint(half, work / "ffn50-i8", "int8")
    pack_checkpoint(src, work / "original-i4", "int4")
    pack_checkpoint(half, work / "ffn50-i4", "int4")
    original = load_model(src, head=True).model.eval()
    pruned = load_model(half, head=True).model.eval()
    return {
        "original, torch fp32": original,
        "original, torch int8": torch_int8(original),
        "original, fpewiden int8": load(work / "original-i8").eval(),
        "FFNs 50%, fpewiden int8": load(work / "ffn50-i8").eval(),
        "FFNs 50%, torch int8": torch_int8(pruned),
        "original, fpewiden int4": load(work / "original-i4").eval(),
        "FFNs 50%, fpewiden int4": load(work / "ffn50-i4").eval(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantized/decode"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ms = models(Path(d), args.layers)
        prompt = torch.randint(100, 30000, (1, 16), generator=torch.Generator().manual_seed(0))

        def gen(m):
            with torch.inference_mode():
                m.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                           pad_token_id=0)  # fmt: skip

        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            res = timed({k: (lambda m=m: gen(m)) for k, m in ms.items()}, 20.0, min_rounds=5, max_rounds=15)
            base = res["original, torch int8"]["median_ms"]
            for k, m in ms.items():
                tps = args.tokens / (res[k]["median_ms"] / 1e3)
                rows.append({"threads": threads, "model": k, "tokens_per_sec": tps, "linear_bytes": linear_bytes(m),
                             "vs_torch_int8": base / res[k]["median_ms"], "timing": res[k]})  # fmt: skip
                print(json.dumps({k2: v for k2, v in rows[-1].items() if k2 != "timing"}), flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = json_document({"command": command, "cpu": cpu_name(), "kernels": kernels.path(), "rows": rows})
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        f"# Decode with int8 and 4-bit weights: Llama-shaped, {args.layers} layers (TinyLlama widths), batch 1",
        "",
        f"`{command}`",
        "",
        f"CPU: {cpu_name()}; fpewiden kernels: {kernels.path()}; {args.tokens} greedy tokens after a 16-token prompt, "
        "models interleaved round by round, medians. Linear MB: the weight bytes the linear layers read per token "
        "(the LM head included; embedding lookups excluded).",
        "",
        "| threads | model | tokens/s | × torch int8 (original) | Linear MB |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['threads']} | {r['model']} | {r['tokens_per_sec']:.1f} | {r['vs_torch_int8']:.2f}× | "
              f"{r['linear_bytes'] / 1e6:.1f} |" for r in rows]  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
