"""A tiny Llama, built offline and trained as a language model on TREC training questions: the causal model the
calibration and bench measurements use (no model can be downloaded here, and a randomly initialised one has no
structure worth keeping).

Word-level tokenizer over the training questions (the 2000 most frequent words, `<unk>`, `<pad>`, `</s>`; no pad
token is declared, as Llama tokenizers ship), Llama with 4 layers of width 128 and SwiGLU FFNs of 512, trained with
AdamW for `--epochs` epochs (seeded, deterministic on CPU). Written as a Hugging Face folder with its tokenizer.

  python bench/tiny_llama.py [--out ~/.cache/fpewiden/tiny-llama-trec --epochs 6]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

import torch

from fpewiden.data.embeddings import cache_dir, task_sentences

VOCAB = 2000


def build_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    counts = collections.Counter(w for t in texts for w, _ in pre.pre_tokenize_str(t.lower()))
    words = [w for w, _ in counts.most_common(VOCAB)]
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", model_input_names=["input_ids", "attention_mask"]
    )
    fast.save_pretrained(str(out))
    return fast


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=cache_dir() / "tiny-llama-trec")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import transformers

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    texts, _ = task_sentences("trec6", "train")
    args.out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(texts, args.out)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg)
    enc = [tok(t + " </s>")["input_ids"][:48] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    steps = args.epochs * math.ceil(len(enc) / 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    history = []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(enc), generator=gen).tolist()
        total, count = 0.0, 0
        for i in range(0, len(order), 64):
            batch = [enc[j] for j in order[i : i + 64]]
            width = max(len(b) for b in batch)
            ids = torch.tensor([b + [tok.eos_token_id] * (width - len(b)) for b in batch])
            mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + float(loss) * len(batch), count + len(batch)
        history.append({"epoch": epoch + 1, "train_loss": total / count, "perplexity": math.exp(total / count)})
        print(history[-1], flush=True)
    model.save_pretrained(str(args.out))
    (args.out / "training.json").write_text(
        json.dumps({"epochs": args.epochs, "seconds": time.perf_counter() - t0, "history": history}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
