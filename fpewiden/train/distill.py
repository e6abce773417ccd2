"""Distillation for Hugging Face models: the student matches the teacher's output on sentences.

Sentence encoders (no head) are matched on the mean-pooled last hidden state, the embedding they are used for;
models with a head would be matched on logits. Teacher outputs are computed once up front, so each training
step runs only the student. The held-out metric is the mean cosine similarity to the teacher.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fpewiden.errors import FpewidenError

MAX_TOKENS = 64


def read_sentences(path: Path, minimum: int = 10, purpose: str = "distillation") -> list[str]:
    """Non-empty lines of a UTF-8 text file; binary files and files with too few lines are one-line errors."""
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


def mean_pool(hidden: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    w = attention.unsqueeze(-1).to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1e-9)


def check_compatible(student_cfg: dict, teacher_cfg: dict) -> None:
    """Same family and the same residual width and depth: only FFN widths may differ."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "n_embd", "n_layer", "vocab_size")
    diff = [k for k in keys if student_cfg.get(k) != teacher_cfg.get(k)]
    if diff:
        k = diff[0]
        raise FpewidenError(
            f"teacher architecture does not match the student: {k} is {teacher_cfg.get(k)!r} in the teacher and "
            f"{student_cfg.get(k)!r} in the student"
        )


class DistillTask:
    def __init__(self, tokenizer, teacher: nn.Module, sentences: list[str], val_fraction: float = 0.1, seed: int = 0):
        order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = max(1, round(len(sentences) * val_fraction))
        self.val = [sentences[i] for i in order[:n_val]]
        self.train_sents = [sentences[i] for i in order[n_val:]]
        self.n_train = len(self.train_sents)
        self.tok = tokenizer
        accepted = inspect.signature(teacher.forward).parameters
        self.keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in accepted]
        self.enc = self._encode(self.train_sents)
        self.enc_val = self._encode(self.val)
        teacher.eval()
        with torch.no_grad():
            self.target = self._embed(teacher, self.enc, torch.device("cpu"))
            self.target_val = self._embed(teacher, self.enc_val, torch.device("cpu"))

    def _encode(self, sents: list[str]) -> dict[str, torch.Tensor]:
        """Token ids the model takes (causal models take no token type ids, which some tokenizers still emit)."""
        enc = self.tok(sents, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        return {k: enc[k] for k in self.keys if k in enc}

    @staticmethod
    def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(**batch)
        if getattr(out, "logits", None) is not None:
            return out.logits
        return mean_pool(out.last_hidden_state, batch["attention_mask"])

    def _embed(
        self, model: nn.Module, enc: dict[str, torch.Tensor], device: torch.device, bs: int = 256
    ) -> torch.Tensor:
        n = len(enc["input_ids"])
        parts = []
        for i in range(0, n, bs):
            batch = {k: v[i : i + bs].to(device) for k, v in enc.items()}
            parts.append(self._forward(model, batch).float().cpu())
        return torch.cat(parts)

    def loss(self, model: nn.Module, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        batch = {k: v[idx].to(device) for k, v in self.enc.items()}
        # trim padding shared by the whole batch
        width = int(batch["attention_mask"].sum(1).max())
        batch = {k: v[:, :width] for k, v in batch.items()}
        return F.mse_loss(self._forward(model, batch).float(), self.target[idx].to(device))

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        model.eval()
        pred = self._embed(model, self.enc_val, device)
        return {
            "loss": float(F.mse_loss(pred, self.target_val)),
            "cosine": float(F.cosine_similarity(pred, self.target_val).mean()),
        }
