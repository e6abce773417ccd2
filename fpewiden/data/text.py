"""Text inputs of Hugging Face models: sample files (one per line) and the tokenizer that turns them into ids."""

from __future__ import annotations

from pathlib import Path

from fpewiden.errors import FpewidenError


def read_sentences(path: Path, minimum: int = 10, purpose: str = "distillation") -> list[str]:
    """Non-empty lines of a UTF-8 text file; binary files and files with too few lines are one-line errors."""
    if path.is_dir():
        raise FpewidenError(f"{path} is a folder; {purpose} reads one text file (one sample per line)")
    if not path.is_file():
        raise FpewidenError(f"no such text file: {path}")
    raw = path.read_bytes()
    if b"\0" in raw[: 1 << 20]:
        raise FpewidenError(f"{path} is not a text file (expected one sample per line)")
    lines = [line.strip() for line in raw.decode("utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line]
    if len(lines) < minimum:
        raise FpewidenError(f"{path}: {purpose} needs at least {minimum} non-empty lines (found {len(lines)})")
    return lines


def load_tokenizer(folders: list[Path], override: Path | None = None):
    """The first tokenizer found: `override`, else in each folder in turn (teacher, then student).

    Causal models (GPT-2, Llama) usually ship no pad token: batches are padded with the EOS token instead, which
    is harmless because every use of the outputs is masked by the attention mask.
    """
    import transformers

    candidates = [override] if override is not None else folders
    tok = None
    for folder in candidates:
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
            continue
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(folder))
            break
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise FpewidenError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0]}") from None
    if tok is None:
        where = " nor ".join(str(f) for f in candidates)
        raise FpewidenError(
            f"no tokenizer in {where}; pass --tokenizer DIR (a folder holding the model's tokenizer.json or "
            "tokenizer_config.json)"
        )
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise FpewidenError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
        tok.pad_token = tok.eos_token
    return tok
