"""Distillation for Hugging Face models: the student matches the teacher's output on sentences.

Sentence encoders (no head) are matched on the mean-pooled last hidden state, the embedding they are used for;
models with a head would be matched on logits. Teacher outputs are computed once up front, so each training
step runs only the student. The held-out metric is the mean cosine similarity to the teacher.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

from fpewiden.errors import FpewidenError
from fpewiden.model.pooling import mean_pool

MAX_TOKENS = 64


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
