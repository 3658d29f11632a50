"""Checkpoint layouts we must accept, quantised shards (against mlx-lm's own model), and bad input."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from fixtures import get_fixture
from fixtures.llamacpp import vocab_test_cases

from model import ModelLoadError, load, load_model
from model.loader import read_safetensors
from model.qwen3_5 import sanitize
from model.config import ModelConfig


def logits(model, ids):
    return np.array(model(mx.array(ids)[None]).astype(mx.float32))[0]


def rel_err(ours, ref):
    return (np.abs(ours - ref).max(-1) / (ref.max(-1) - ref.min(-1))).max()


def copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(get_fixture(name).hf_dir, dst)
    return dst


def rewrite_weights(directory, edit):
    """Replace the directory's safetensors with edit(weights) in one file (bf16 kept by mlx)."""
    weights, _ = read_safetensors(directory)
    for f in directory.glob("*.safetensors*"):
        f.unlink()
    mx.save_safetensors(str(directory / "model.safetensors"), edit(dict(weights)), {"format": "pt"})


def fuse_experts(weights, n_layers, n_experts):
    """transformers' fused layout: experts.gate_up_proj [E, 2I, H] (gate first), down_proj [E, H, I]."""
    for layer in range(n_layers):
        p = f"model.layers.{layer}.mlp.experts"
        gate = [weights.pop(f"{p}.{e}.gate_proj.weight") for e in range(n_experts)]
        up = [weights.pop(f"{p}.{e}.up_proj.weight") for e in range(n_experts)]
        down = [weights.pop(f"{p}.{e}.down_proj.weight") for e in range(n_experts)]
        weights[f"{p}.gate_up_proj"] = mx.concatenate([mx.stack(gate), mx.stack(up)], axis=1)
        weights[f"{p}.down_proj"] = mx.stack(down)
    return weights


def test_published_layout_loads(tmp_path):
    """As published: model.language_model. prefix, fused experts, sharded with an index, plus
    vision and mtp weights that must be ignored."""
    fx = get_fixture("moe_r4")
    cfg = fx.config
    d = copy_fixture("moe_r4", tmp_path)

    weights, _ = read_safetensors(d)
    weights = fuse_experts(dict(weights), cfg["num_hidden_layers"], cfg["num_experts"])
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in weights.items()}
    renamed["model.visual.blocks.0.attn.qkv.weight"] = mx.zeros((3, 3))
    renamed["mtp.layers.0.input_layernorm.weight"] = mx.zeros((cfg["hidden_size"],))
    for f in d.glob("*.safetensors*"):
        f.unlink()
    keys = sorted(renamed)
    half = len(keys) // 2
    index = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        mx.save_safetensors(str(d / name), {k: renamed[k] for k in part}, {"format": "pt"})
        index.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    wrapper = {"model_type": "qwen3_5_moe", "text_config": {**cfg, "model_type": "qwen3_5_moe_text"},
               "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}
    (d / "config.json").write_text(json.dumps(wrapper))

    model, tokenizer = load(d, dtype="float32")
    assert rel_err(logits(model, fx.prompt_ids), fx.ref_logits) <= 1e-3
    cases = [(text, ids) for text, ids in vocab_test_cases() if text.strip()][:20]
    assert cases
    for text, ids in cases:
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text


def test_sanitize_is_idempotent():
    fx = get_fixture("moe_r3_fa2")
    config = ModelConfig.from_file(fx.hf_dir / "config.json")
    raw, _ = read_safetensors(fx.hf_dir)
    once, _ = sanitize(raw, config)
    twice, _ = sanitize(once, config)
    assert once.keys() == twice.keys()
    for k in once:
        assert mx.array_equal(once[k], twice[k]), k


@pytest.mark.parametrize("name", ["moe_r4", "dense_r2_tied"])
def test_mlx_lm_quantized_shards_match_mlx_lm(name, tmp_path):
    """mlx-lm converts and quantises (4-bit, router 8-bit per-module overrides); our loader must
    read its shards and compute what mlx-lm's own model computes from them."""
    from mlx_lm import convert as mlx_convert
    from mlx_lm import load as mlx_load

    fx = get_fixture(name)
    cfg = fx.config
    src = copy_fixture(name, tmp_path)
    moe = cfg.get("num_experts", 0) > 0
    if moe:
        rewrite_weights(src, lambda w: fuse_experts(w, cfg["num_hidden_layers"], cfg["num_experts"]))
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_5_moe" if moe else "qwen3_5"}))
    out = tmp_path / "mlx4"
    mlx_convert(str(src), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32)
    qcfg = json.loads((out / "config.json").read_text())["quantization"]
    if moe:
        assert any(isinstance(v, dict) and v.get("bits") == 8 for v in qcfg.values())

    ref_model, _ = mlx_load(str(out))
    ref_model.set_dtype(mx.float32)
    ref = np.array(ref_model(mx.array(fx.prompt_ids)[None]).astype(mx.float32))[0]
    ours = logits(load_model(out, dtype="float32"), fx.prompt_ids)
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.999
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


# ---- bad input: one clear message naming the file or tensor ----


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(tmp_path)


def test_unsupported_model_type(tmp_path):
    d = copy_fixture("dense_r2_tied", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="unsupported model_type 'llama'"):
        load_model(d)


def test_missing_tensor_is_named(tmp_path):
    d = copy_fixture("dense_r2_tied", tmp_path)
    rewrite_weights(d, lambda w: {k: v for k, v in w.items() if not k.endswith("layers.1.linear_attn.A_log")})
    with pytest.raises(ModelLoadError, match=r"layers\.1\.linear_attn\.A_log"):
        load_model(d)


def test_missing_expert_is_named(tmp_path):
    d = copy_fixture("moe_r1_tied", tmp_path)
    rewrite_weights(d, lambda w: {k: v for k, v in w.items() if k != "model.layers.2.mlp.experts.3.up_proj.weight"})
    with pytest.raises(ModelLoadError, match=r"layers\.2\.mlp but lacks expert 3 \(up_proj\)"):
        load_model(d)


def test_misshaped_tensor_is_named_with_its_file(tmp_path):
    d = copy_fixture("dense_r2_tied", tmp_path)
    key = "model.layers.0.linear_attn.in_proj_z.weight"

    def edit(w):
        w[key] = w[key][:-1]
        return w

    rewrite_weights(d, edit)
    with pytest.raises(ModelLoadError, match=rf"{key}.*model\.safetensors.*shape"):
        load_model(d)


def test_corrupt_safetensors_is_named(tmp_path):
    d = copy_fixture("dense_r2_tied", tmp_path)
    (f,) = list(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f.name):
        load_model(d)


def test_no_weights(tmp_path):
    d = copy_fixture("dense_r2_tied", tmp_path)
    for f in d.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(d)
