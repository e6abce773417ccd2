"""What `fpewiden bench` scores a Hugging Face model on, and how (hf.py runs the models).

An evaluation set is a text file, a TSV of labelled sentences or `embed:TASK[,n=N]`; a model's outputs on it are
its mean-pooled embeddings and, for causal models, its next-token predictions; the metrics compare them with the
reference model's: cosine, a logistic-regression probe's accuracy, perplexity and top-1 agreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fpewiden.model.pooling import mean_pool

EVAL_BATCH = 32
PROBE_TRAIN = 3000


@dataclass
class EvalSet:
    """What accuracy is measured on. `texts` are scored for every model; `train_*` feed the probe."""

    spec: str
    texts: list[str]
    labels: list[str] | None = None
    train_texts: list[str] = field(default_factory=list)
    train_labels: list[str] = field(default_factory=list)

    def describe(self) -> str:
        if self.labels is None:
            return f"{self.spec}: {len(self.texts)} text samples"
        return f"{self.spec}: probe on {len(self.train_texts)} reference embeddings, scored on {len(self.texts)}"


def load_eval(spec: str, seed: int = 0) -> EvalSet:
    """A text file, labelled sentences (a .tsv of `text<TAB>label` lines or a .csv with text and label columns: the
    format `embed:FILE` reads too, split 80/20 by the seed), or `embed:TASK[,n=N]` (../shared/datasets)."""
    from fpewiden.data.text import read_sentences

    s = spec.strip()
    if s.startswith("embed:"):
        from fpewiden.data.embeddings import parse_embed, task_sentences

        task, n = parse_embed(s)
        tr_x, tr_y = task_sentences(task, "train")
        te_x, te_y = task_sentences(task, "test")
        tr_n = min(n or PROBE_TRAIN, PROBE_TRAIN)
        te_n = max(1, n // 4) if n else len(te_x)
        return EvalSet(s, te_x[:te_n], te_y[:te_n], tr_x[:tr_n], tr_y[:tr_n])
    path = Path(s)
    if path.suffix.lower() in (".tsv", ".csv"):
        from fpewiden.data.embeddings import read_text_labels

        read_sentences(path, 10, "a labelled benchmark")  # the same checks as any text file: exists, enough lines
        rows = [(y, t) for t, y in zip(*read_text_labels(path), strict=True)]
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, len(rows) // 5)
        test, train = [rows[i] for i in order[:n_test]], [rows[i] for i in order[n_test:]]
        return EvalSet(s, [t for _, t in test], [y for y, _ in test], [t for _, t in train], [y for y, _ in train])
    return EvalSet(s, read_sentences(path, 10, "a text benchmark"))


@dataclass
class Outputs:
    """One model's outputs on the evaluation texts: pooled embeddings and next-token predictions."""

    embeddings: torch.Tensor | None = None
    nll: float | None = None  # mean next-token negative log-likelihood over the text
    argmax: list[torch.Tensor] | None = None  # per batch, predicted next token at each position


class Forward:
    """Runs a model (torch or ONNX Runtime) on tokenized batches; returns (hidden states or None, logits or None)."""

    def __init__(self, torch_model=None, session=None):
        self.model, self.session = torch_model, session

    @torch.no_grad()
    def __call__(self, feeds: dict[str, np.ndarray]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.session is not None:
            names = [o.name for o in self.session.get_outputs()]
            out = self.session.run(None, {i.name: feeds[i.name] for i in self.session.get_inputs()})[0]
            t = torch.from_numpy(out)
            return (None, t) if names[0] == "logits" else (t, None)
        batch = {k: torch.from_numpy(v) for k, v in feeds.items()}
        out = self.model(**batch, output_hidden_states=True)
        logits = getattr(out, "logits", None)
        hidden = out.hidden_states[-1] if logits is not None else out.last_hidden_state
        return hidden, logits


def evaluate(forward: Forward, batches: list[dict[str, np.ndarray]]) -> Outputs:
    pooled, nll, count, argmax = [], 0.0, 0, []
    for feeds in batches:
        hidden, logits = forward(feeds)
        mask = torch.from_numpy(feeds["attention_mask"])
        if hidden is not None:
            pooled.append(mean_pool(hidden.float(), mask))
        if logits is not None:
            ids = torch.from_numpy(feeds["input_ids"])
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            keep = mask[:, 1:].bool()
            target = ids[:, 1:]
            nll -= float(logp.gather(2, target.unsqueeze(2)).squeeze(2)[keep].sum())
            count += int(keep.sum())
            argmax.append(torch.where(keep, logits[:, :-1].argmax(-1), -1))
    return Outputs(torch.cat(pooled) if pooled else None, nll / count if count else None, argmax if argmax else None)


def metrics(out: Outputs, ref: Outputs, probe=None, labels: list[str] | None = None) -> dict[str, float]:
    m: dict[str, float] = {}
    if out.embeddings is not None and ref.embeddings is not None:
        m["cosine"] = float(torch.nn.functional.cosine_similarity(out.embeddings, ref.embeddings).mean())
        if probe is not None and labels is not None:
            emb = torch.nn.functional.normalize(out.embeddings, dim=1).numpy()
            m["probe_accuracy"] = float(probe.score(emb, labels))
    if out.nll is not None:
        m["perplexity"] = float(np.exp(out.nll))
        if ref.argmax is not None:
            same = sum(int(((a == r) & (r >= 0)).sum()) for a, r in zip(out.argmax, ref.argmax, strict=True))
            total = sum(int((r >= 0).sum()) for r in ref.argmax)
            m["agreement"] = same / total
    return m


def tokenize(tok, texts: list[str], seq_len: int) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(0, len(texts), EVAL_BATCH):
        enc = tok(texts[i : i + EVAL_BATCH], padding=True, truncation=True, max_length=seq_len, return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"]})
    return out
