"""Where a decoded token's time goes: each Linear layer's latency inside greedy decoding, against the whole token.

The models of bench/quantized_decode.py (a Llama-shaped decoder with TinyLlama's widths, random weights): torch's
dynamic int8 of the original, fpewiden's int8 of the original and of its FFNs at 50%. Timing hooks around every
projection and the LM head record one-token calls only (the prompt's prefill is left out); per layer kind, the
median call, times the calls per token; "other" is the rest of the token (attention, norms, transformers'
generate loop), the same work for every model. It bounds the tokens/s ratio fpewiden can reach against torch int8
at given Linear times: (other + torch's Linear time) / (other + fpewiden's).

  python bench/decode_breakdown.py [--threads 1 --layers 4 --tokens 32 --out bench/results/quantized/decode_breakdown]
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from packed import cpu_name
from quantized_decode import models

from fpewiden.io.provenance import MD_MARKER, json_document
from fpewiden.packed import kernels

MODELS = ("original, torch int8", "original, fpewiden int8", "FFNs 50%, fpewiden int8")


def hook(model: torch.nn.Module, calls: dict[str, list[float]]) -> None:
    """Record each one-token call of the model's projections and LM head, by kind (q_proj, …, lm_head)."""
    for name, m in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if not (kind.endswith("_proj") or kind == "lm_head"):
            continue

        def pre(mod, inp):
            mod._fpw_t0 = time.perf_counter()

        def post(mod, inp, out, kind=kind):
            if inp[0].shape[-2] == 1:
                calls[kind].append(time.perf_counter() - mod._fpw_t0)

        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantized/decode_breakdown"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        ms = {k: v for k, v in models(Path(d), args.layers).items() if k in MODELS}
        prompt = torch.randint(100, 30000, (1, 16), generator=torch.Generator().manual_seed(0))
        calls = {k: collections.defaultdict(list) for k in ms}
        tokens = {k: [] for k in ms}
        for k, m in ms.items():
            hook(m, calls[k])
        for _ in range(args.rounds):  # models interleaved round by round; a round is one prompt + tokens
            for k, m in ms.items():
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    m.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
                    t1 = time.perf_counter()
                    m.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                               pad_token_id=0)  # fmt: skip
                    t2 = time.perf_counter()
                tokens[k].append(((t2 - t1) - (t1 - t0)) / (args.tokens - 1))  # one decoded token, prefill removed
    for k in ms:
        per_token = statistics.median(tokens[k])
        per = args.rounds * (args.tokens - 1)  # decoded tokens seen by the hooks (the prefills are not one-token)
        kinds = {kind: statistics.median(v) * len(v) / per for kind, v in calls[k].items()}
        linear = sum(kinds.values())
        ms_kinds = {q: v * 1e3 for q, v in kinds.items()}
        rows.append({"model": k, "token_ms": per_token * 1e3, "linear_ms": linear * 1e3,
                     "other_ms": (per_token - linear) * 1e3, "kinds_ms": ms_kinds})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = json_document({"command": command, "cpu": cpu_name(), "kernels": kernels.path(), "rows": rows})
    (args.out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    kinds = list(rows[0]["kinds_ms"])
    lines = [
        f"# Where a decoded token's time goes: Llama-shaped, {args.layers} layers (TinyLlama widths), batch 1",
        "",
        f"`{command}`",
        "",
        f"CPU: {cpu_name()}; fpewiden kernels: {kernels.path()}; {args.threads} thread(s); medians of "
        f"{args.rounds} interleaved rounds of {args.tokens} tokens. ms per decoded token: each Linear kind's median "
        "call times its calls per token (all layers), their sum, and the rest of the token.",
        "",
        "| model | token | Linear | other | " + " | ".join(kinds) + " |",
        "|---|---|---|---|" + "---|" * len(kinds),
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['token_ms']:.2f} | {r['linear_ms']:.2f} | {r['other_ms']:.2f} | "
                     + " | ".join(f"{r['kinds_ms'][q]:.3f}" for q in kinds) + " |")  # fmt: skip
    base, last = rows[0], rows[-1]
    bound = (base["other_ms"] + base["linear_ms"]) / (base["other_ms"] + last["linear_ms"])
    lines += ["", f"{last['model']}: its Linear layers take {last['linear_ms'] / base['linear_ms']:.2f}× torch int8's "
              f"Linear time; with the rest of the token as long as torch int8's ({base['other_ms']:.2f} ms), it "
              f"would decode at {bound:.2f}× torch int8's tokens/s."]  # fmt: skip
    (args.out / "results.md").write_text("\n".join(lines) + f"\n\n{MD_MARKER}\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
