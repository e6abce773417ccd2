"""Small checkpoints that tests build themselves."""

import itertools
from pathlib import Path

import torch
from safetensors.torch import save_file


def mlp_state(widths=(12, 16, 10, 3), seed=0, density=1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        w = torch.randn(b, a, generator=g)
        if density < 1.0:
            w = w * (torch.rand(b, a, generator=g) < density)
            w[:, :4] = torch.randn(b, 4, generator=g)  # keep fan-in >= 4 so α up to 4 can split
        sd[f"{2 * i}.weight"] = w
        sd[f"{2 * i}.bias"] = torch.randn(b, generator=g)
    return sd


def write_mlp(path: Path, **kw) -> Path:
    save_file(mlp_state(**kw), str(path))
    return path


WORDS = (
    "what who where when why how is are the a of in to and which city country river name year first largest "
    "capital people many does do did was were for on by with from at as it its this that an be has have"
).split()


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
EOS = 4
VOCAB = 96  # the models' vocabulary: room for SPECIALS, WORDS and the digits


def word_tokenizer(path: Path, pad: bool = True, bert: bool = True):
    """A small word-level tokenizer built offline (no download), saved in `path`.

    `pad=False` mimics GPT-2 and Llama tokenizers, which ship without a pad token; `bert=False` drops token type
    ids, which causal models do not take.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + [str(i) for i in range(20)])}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        eos_token="</s>",
        **({"pad_token": "[PAD]"} if pad else {}),
        model_input_names=["input_ids", "token_type_ids", "attention_mask"]
        if bert
        else ["input_ids", "attention_mask"],
    )
    fast.save_pretrained(str(path))
    return len(vocab)


def tiny_bert(path: Path, dropout: float = 0.1, tokenizer: bool = True, seed: int = 0) -> Path:
    """A 2-layer BERT with dropout, built offline; with a word-level tokenizer unless `tokenizer` is False."""
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    transformers.BertModel(cfg).save_pretrained(str(path))
    if tokenizer:
        word_tokenizer(path)
    return path


def tiny_causal(path: Path, family: str = "llama", pad: bool = False, seed: int = 0) -> Path:
    """A 2-layer causal LM with its head (llama, gpt2, opt or qwen2), and a tokenizer without a pad token."""
    import transformers

    torch.manual_seed(seed)
    t = transformers
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64)
    ids = dict(bos_token_id=EOS, eos_token_id=EOS)
    cfg = {
        "llama": lambda: t.LlamaConfig(hidden_size=16, intermediate_size=32, num_key_value_heads=2, **common, **ids),
        "qwen2": lambda: t.Qwen2Config(hidden_size=16, intermediate_size=32, num_key_value_heads=2, **common, **ids),
        "opt": lambda: t.OPTConfig(hidden_size=16, ffn_dim=32, word_embed_proj_dim=16, **common, **ids),
        "gpt2": lambda: t.GPT2Config(
            n_embd=16, n_layer=2, n_head=2, n_inner=32, vocab_size=VOCAB, n_positions=64, **ids
        ),
    }[family]()
    t.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    word_tokenizer(path, pad=pad, bert=False)
    return path


def sentences(path: Path, n: int = 40) -> Path:
    rows = [
        f"what is the name of the {w} {i % 20}" if i % 2 else f"which city was the first capital of {w} {i % 20}"
        for i, w in enumerate(WORDS[:n] * (1 + n // len(WORDS)))
    ][:n]
    path.write_text("\n".join(rows) + "\n")
    return path
