"""`fpewiden bench` on Hugging Face models: folders (torch; their ONNX export for ort) and their ONNX files.

Accuracy, in the ways users measure encoders and decoders, all against the reference model (the first):
- a text file: cosine of the mean-pooled last hidden state to the reference's; for causal models also the
  perplexity of each model on the text and the top-1 agreement of its next-token predictions with the reference;
- labelled sentences (`embed:trec6|trec50|sst5[,n=N]`, or a .tsv of `text<TAB>label` lines or a .csv with
  text and label columns): a logistic-regression probe trained once on the reference's embeddings of the train
  split, scored on every model's embeddings of the held-out split (the same probe for every model), plus the
  cosine on the held-out split.
Bytes per storage format are counted per group of linear layers (attention, FFN, head; embeddings apart, since a
lookup reads only the rows it needs); latency per engine, batch size and sequence length.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fpewiden.benchmark.competitors import (
    adopt_reference,
    quantized_export,
    reference_engines,
    split_engines,
    torch_int8_entry,
)
from fpewiden.benchmark.competitors import label as competitor_label
from fpewiden.benchmark.formats import GROUPS, group_of, model_bytes, pair_layouts
from fpewiden.benchmark.hf_eval import EvalSet, Forward, evaluate, metrics, tokenize
from fpewiden.benchmark.measure import (
    MeasuredModel,
    Workload,
    model_labels,
    ort_session,
    packed_onnx,
    refuse_packed_onnx,
    rss_mb,
    summarise,
    time_entries,
)
from fpewiden.errors import FpewidenError
from fpewiden.packed.format import packed_bytes
from fpewiden.packed.pack import widened_alphas
from fpewiden.packed.reader import is_packed


def grouped_bytes(
    masks: dict[str, torch.Tensor], vectors: int, ffn: set[str], pairs=None, packed: dict[str, int] | None = None
) -> dict:
    """Bytes per group and format; `total` is what one inference reads: every group but the embedding tables.
    `packed`: each matrix's bytes in fpewiden's packed format."""
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    for n, m in masks.items():
        groups[group_of(n, ffn)][n] = m
    by = {}

    def packed_sum(names) -> int | None:
        return sum(packed[n] for n in names) if packed is not None else None

    for g, ms in groups.items():
        if ms:
            gp = [p for p in (pairs or []) if p.ins[0] in ms]
            by[g] = model_bytes(ms, 0, gp or None, packed_sum(ms))
    moved = {n: m for g, ms in groups.items() if g != "embeddings" for n, m in ms.items()}
    return {"total": model_bytes(moved, vectors, pairs, packed_sum(moved)), "groups": by}


def _from_folder(path: Path, engines, device, tmp: Path, threads: int) -> tuple[MeasuredModel, Forward]:
    from fpewiden.arch import find_pairs
    from fpewiden.export.export import export
    from fpewiden.model.loaded import load_model
    from fpewiden.model.skeleton import has_lm_head

    loaded = load_model(path, head=True)
    e = MeasuredModel(path)
    tensors = {n: loaded.ck.get(n) for n in loaded.ck.shapes}
    mats = {n: t for n, t in tensors.items() if t.dim() == 2 and t.is_floating_point()}
    masks = {n: loaded.masks.get(n, t != 0) for n, t in mats.items()}
    ffn = {n for p in find_pairs(loaded.ck) for n in (*p.in_weights, p.out_weight)}
    if (loaded.ck.config or {}).get("tie_word_embeddings") and getattr(loaded.model, "lm_head", None) is not None:
        head = "lm_head.weight"  # tied: the LM head reads the whole embedding table
        if head not in masks:
            table = next(n for n in masks if "embed_tokens" in n or n.endswith("wte.weight"))
            masks[head] = masks[table]
    alphas = widened_alphas(loaded.ck)
    conv1d = (loaded.ck.config or {}).get("model_type") == "gpt2"  # Conv1D stores W transposed
    packed = {n: packed_bytes(m.T if conv1d else m, 4, alphas.get(n)) for n, m in masks.items()}
    layouts, masks = pair_layouts(loaded, masks)
    fast = bool(layouts) and all(p.structure is not None for p in layouts)
    vectors = sum(t.numel() for t in tensors.values() if t.dim() == 1 and t.is_floating_point())
    meta = loaded.ck.meta
    b = grouped_bytes(masks, vectors, ffn, layouts, packed)
    e.info.update(
        kind="hf",
        neurons=sum(loaded.ck.shapes[p.in_weights[0]][1 if p.transposed else 0] for p in find_pairs(loaded.ck)),
        nnz=sum(int(torch.count_nonzero(masks[n])) for n in masks if group_of(n, ffn) != "embeddings"),
        params=sum(t.numel() for t in tensors.values()),
        bytes=b["total"],
        bytes_by_group=b["groups"],
        fpewiden={k: getattr(meta, k) for k in ("alpha", "split", "outgoing", "budget_spec") if getattr(meta, k)},
    )
    if "ort" in engines:
        family = (loaded.ck.config or {}).get("model_type")
        layout = "fast" if fast and family not in ("gpt2", "opt", "clip", "siglip") else "dense"
        onnx_path = tmp / f"{len(list(tmp.iterdir()))}.onnx"
        # the fast layout swaps the FFN modules: export a copy, so torch still runs the model as transformers does
        export(path, onnx_path, layout, verify=False, model=copy.deepcopy(loaded) if layout == "fast" else loaded)
        e.info["ort_layout"] = layout
        e.exported = onnx_path if layout == "dense" else None
        sess = ort_session(onnx_path, threads, device)
        e.runners["ort"] = _session_runner(sess)
    model = loaded.model.eval().to(device)
    causal = has_lm_head(loaded.ck.config or {})
    if "packed" in engines or "ort-packed" in engines:
        from fpewiden.packed import kernels
        from fpewiden.packed.swap import pack_linears

        twin = copy.deepcopy(model).cpu()  # the packed kernels run on the CPU
        pack_linears(twin, _twin_alphas(model, twin, loaded.param_of, alphas))
        e.info["packed_kernel"] = kernels.path()
        if "packed" in engines:
            e.runners["packed"] = _torch_runner(twin, torch.device("cpu"))
            if causal:
                e.decoders["packed"] = twin
        if "ort-packed" in engines:
            vocab = int((loaded.ck.config or {}).get("vocab_size", 1000))
            sess = ort_session(packed_onnx(twin, "hf", vocab, tmp), threads)
            e.runners["ort-packed"] = _session_runner(sess)
    if "torch" in engines:
        e.runners["torch"] = _torch_runner(model, device)
        if causal:
            e.decoders["torch"] = model
    return e, Forward(torch_model=model)


def _from_packed(path: Path, engines) -> tuple[MeasuredModel, Forward]:
    """A packed folder (`fpewiden pack`) on fpewiden's kernels, at the bytes it stores."""
    from fpewiden.benchmark.packed_files import packed_model
    from fpewiden.model.skeleton import has_lm_head

    info, model, _ = packed_model(path, engines)
    e = MeasuredModel(path)
    e.info.update(info)
    e.runners["packed"] = _torch_runner(model, torch.device("cpu"))
    if has_lm_head(json_config(path) or {}):
        e.decoders["packed"] = model
    return e, Forward(torch_model=model)


def _competitor(ref: MeasuredModel, competitor: str, device, tmp: Path, threads: int):
    """A quantized competitor of the reference (benchmark/competitors.py): its entry and its forward for scoring."""
    from fpewiden.model.loaded import load_model
    from fpewiden.model.skeleton import has_lm_head

    if competitor != "torch-int8":
        e, fwd = _from_onnx(quantized_export(ref, competitor, tmp), ["ort"], device, threads)
        adopt_reference(e, ref, competitor)
        return e, fwd
    e, q = torch_int8_entry(ref, device, lambda: load_model(ref.path, head=True).model,
                            lambda n: group_of(n, set()) != "embeddings")  # fmt: skip
    e.info["bytes_by_group"] = {"as stored": e.info["bytes"]["stored"]}
    e.runners["torch"] = _torch_runner(q, torch.device("cpu"))
    if has_lm_head(json_config(ref.path) or {}):
        e.decoders["torch"] = q
    return e, Forward(torch_model=q)


def _session_runner(sess):
    """An ONNX Runtime session fed the inputs it declares."""
    names = [i.name for i in sess.get_inputs()]
    return lambda feeds: sess.run(None, {n: feeds[n] for n in names})


def _torch_runner(model, device: torch.device):
    def run(feeds: dict[str, np.ndarray]):
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v).to(device) for k, v in feeds.items()})
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

    return run


def _twin_alphas(model, twin, param_of: dict, alphas: dict[str, int]) -> dict[int, int]:
    """α of the FPE-widened incoming matrices, keyed by the copy's parameters (pack_linears' key)."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(twin.named_parameters())
    return {id(params[names[id(param_of[n])]]): a for n, a in alphas.items() if id(param_of.get(n)) in names}


def _from_onnx(path: Path, engines, device, threads: int) -> tuple[MeasuredModel, Forward]:
    import onnx

    from fpewiden.benchmark.onnx_weights import (
        initializer_arrays,
        quantized,
        quantized_bytes,
        stored_bytes,
        stored_nonzeros,
    )

    if "ort" not in engines:
        raise FpewidenError(f"{path} is an ONNX file: measure it with --engines ort")
    proto = onnx.load(str(path))
    refuse_packed_onnx(path, proto)
    arrays = initializer_arrays(proto)
    masks = {
        n: torch.from_numpy(np.asarray(a, dtype=np.float32) != 0)
        for n, a in arrays.items()
        if a.ndim == 2 and a.dtype.kind == "f"
    }
    vectors = sum(a.size for a in arrays.values() if a.ndim == 1 and a.dtype.kind == "f")
    b = grouped_bytes(masks, vectors, set())
    e = MeasuredModel(path)
    e.info.update(
        kind="onnx",
        neurons=None,
        nnz=sum(int(m.sum()) for n, m in masks.items() if group_of(n, set()) != "embeddings"),
        params=sum(a.size for a in arrays.values()),
        bytes=b["total"],
        bytes_by_group=b["groups"],
        ort_layout="as given",
    )
    if quantized(arrays):  # integer weights: what the file stores, exactly (the float masks miss them)
        moved = {n: a for n, a in arrays.items() if group_of(n, set()) != "embeddings"}  # as every row counts
        e.info.update(nnz=stored_nonzeros(moved), bytes=quantized_bytes(moved),
                      bytes_by_group={"as stored": stored_bytes(moved)},
                      ort_layout="quantized, as given")  # fmt: skip
    sess = ort_session(path, threads, device)
    e.runners["ort"] = _session_runner(sess)
    return e, Forward(session=sess)


def json_config(folder: Path) -> dict | None:
    import json

    f = folder / "config.json"
    return json.loads(f.read_text()) if f.is_file() else None


def tokenizer_for(paths: list[Path], override: Path | None):
    from fpewiden.data.text import load_tokenizer

    folders = [p for p in paths if p.is_dir()]
    return load_tokenizer(folders, override)


def workloads(batch_sizes: list[int], seq_lens: list[int], vocab: int) -> list[Workload]:
    g = torch.Generator().manual_seed(0)
    out = []
    for t in seq_lens:
        for b in batch_sizes:
            ids = torch.randint(vocab, (b, t), generator=g).numpy().astype(np.int64)
            out.append(Workload(f"{b}x{t}", b, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, t))
    return out


def bench(
    paths: list[Path],
    data: EvalSet,
    batch_sizes: list[int],
    seq_lens: list[int],
    engines: list[str],
    device: torch.device,
    repeat: int,
    warmup: int,
    threads: int,
    tokenizer: Path | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> list[dict]:
    """The first path is the reference. `say` receives progress lines."""
    tok = tokenizer_for(paths, tokenizer)
    eval_batches = tokenize(tok, data.texts, max(seq_lens))
    entries, forwards = [], []
    plain, competitors = split_engines(engines)
    labels = model_labels(paths)
    with tempfile.TemporaryDirectory() as d:
        for i, (p, label) in enumerate(zip(paths, labels, strict=True)):
            mine = reference_engines(plain, competitors) if i == 0 else plain
            say(f"loading {label} ({i + 1}/{len(paths)}; {', '.join(mine)})")
            before = rss_mb()
            if p.suffix == ".onnx":
                e, fwd = _from_onnx(p, mine, device, threads)
            elif is_packed(p):
                e, fwd = _from_packed(p, mine)
            else:
                e, fwd = _from_folder(p, mine, device, Path(d), threads)
            e.info["memory_mb"] = max(0.0, rss_mb() - before)
            entries.append(e)
            forwards.append(fwd)
        for c in competitors:
            say(f"building {competitor_label(labels[0], c)}")
            before = rss_mb()
            e, fwd = _competitor(entries[0], c, device, Path(d), threads)
            e.label = competitor_label(labels[0], c)
            e.info["memory_mb"] = max(0.0, rss_mb() - before)
            entries.append(e)
            forwards.append(fwd)
        ref = evaluate(forwards[0], eval_batches)
        probe = None
        if data.labels is not None:
            from sklearn.linear_model import LogisticRegression

            train = evaluate(forwards[0], tokenize(tok, data.train_texts, max(seq_lens)))
            if train.embeddings is None:
                raise FpewidenError(f"{paths[0]} has no hidden states to probe (an ONNX export of a causal LM)")
            emb = torch.nn.functional.normalize(train.embeddings, dim=1).numpy()
            probe = LogisticRegression(max_iter=2000, C=10.0).fit(emb, data.train_labels)
        for e, fwd, label in zip(entries, forwards, [*labels, *(e.label for e in entries[len(paths) :])], strict=True):
            say(f"scoring {label} on {data.spec}")
            out = ref if fwd is forwards[0] else evaluate(fwd, eval_batches)
            e.info["metrics"] = metrics(out, ref, probe, data.labels)
            if data.labels is not None:  # the probe's accuracy is a share of the held-out sentences
                e.info["metric_samples"] = {"probe_accuracy": len(data.labels)}
        vocab = min([len(tok), *((json_config(p) or {}).get("vocab_size", len(tok)) for p in paths if p.is_dir())])
        time_entries(entries, workloads(batch_sizes, seq_lens, vocab), repeat, warmup, say)
        time_decode(entries, vocab, say)
    rows = summarise(entries, threads)
    for row, e in zip(rows, entries, strict=True):
        if "decode" in e.info:
            row["decode"] = e.info["decode"]
    return rows


DECODE_TOKENS = 32  # greedy tokens generated after a 16-token prompt, batch 1, KV cache on
DECODE_ROUNDS = 5


def time_decode(entries: list[MeasuredModel], vocab: int, say: Callable[[str], None]) -> None:
    """Decode speed of causal LMs: tokens per second of `generate`, batch 1, round-robin over models and engines,
    median of DECODE_ROUNDS (after one untimed run each)."""
    import statistics
    import time

    jobs = [(e, eng, m) for e in entries for eng, m in e.decoders.items()]
    if not jobs:
        return
    say(f"timing decode: {len(jobs)} model×engine runs × {DECODE_ROUNDS} rounds of {DECODE_TOKENS} tokens")
    prompt = torch.randint(vocab, (1, 16), generator=torch.Generator().manual_seed(0))

    def generate(m) -> None:
        with torch.inference_mode():
            m.generate(
                prompt.to(m.device),
                max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False,
                pad_token_id=m.config.eos_token_id if m.config.eos_token_id is not None else 0,
            )  # fmt: skip

    for _, _, m in jobs:
        generate(m)
    times: dict[tuple[int, str], list[float]] = {(id(e), eng): [] for e, eng, _ in jobs}
    for _ in range(DECODE_ROUNDS):
        for e, eng, m in jobs:
            t = time.perf_counter()
            generate(m)
            times[(id(e), eng)].append(time.perf_counter() - t)
    for e, eng, _ in jobs:
        med = statistics.median(times[(id(e), eng)])
        e.info.setdefault("decode", {})[eng] = {
            "tokens_per_sec": DECODE_TOKENS / med,
            "median_s": med,
            "new_tokens": DECODE_TOKENS,
            "prompt_tokens": 16,
            "batch": 1,
        }
