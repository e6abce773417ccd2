"""A randomly initialised Llama of a given shape, written offline as a Hugging Face folder with a word-level
tokenizer over TREC's training questions: the checkpoint the memory and FSDP measurements scale with (their cost
depends on the shapes, not on what the weights learned).

  python bench/llama_shaped.py --out /tmp/llama --hidden 2048 --ffn 5632 --layers 8 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from fpewiden.data.embeddings import task_sentences


def build(out: Path, hidden: int, ffn: int, layers: int, heads: int = 32, kv_heads: int = 4,
          dtype: str = "bfloat16", seed: int = 0) -> Path:  # fmt: skip
    import transformers
    from tiny_llama import build_tokenizer

    torch.manual_seed(seed)
    texts, _ = task_sentences("trec6", "train")
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(texts, out)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = transformers.LlamaModel(cfg).to(getattr(torch, dtype))
    model.save_pretrained(str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    build(a.out, a.hidden, a.ffn, a.layers, a.heads, a.kv_heads, a.dtype)


if __name__ == "__main__":
    main()
