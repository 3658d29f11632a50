"""Quantisation: bit packing against mx.quantize, the weighted scale search, recipes, and quantised
conversions of the fixtures (load in both loaders, generate, report sizes)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from fixtures import get_fixture

from convert import ConvertError, convert
from convert.quantize import pack, quantize, weighted_search
from convert.recipes import QuantSpec, fit_group_size, load_recipe, parse_recipe
from model import load_model

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_pack_matches_mx_quantize(bits, group):
    w = mx.array(RNG.normal(size=(3, 5, 256)).astype(np.float32))
    wq, s, b = mx.quantize(w, group_size=group, bits=bits)
    dq = mx.dequantize(wq, s, b, group_size=group, bits=bits)
    codes = mx.round((dq.reshape(3, 5, -1, group) - b[..., None]) / s[..., None]).reshape(w.shape)
    assert mx.array_equal(pack(codes.astype(mx.uint32), bits), wq)


def test_plain_path_is_mx_quantize():
    x = RNG.normal(size=(4, 128)).astype(np.float32)
    wq, s, _b = quantize(x, QuantSpec(4, 64), "bfloat16")
    ref = mx.quantize(mx.array(x).astype(mx.bfloat16), group_size=64, bits=4)
    assert np.array_equal(wq, np.array(ref[0]))
    assert np.array_equal(s, np.array(ref[1].view(mx.uint16)))


def weighted_error(x, imp, parts, spec):
    wq, s, b = (mx.array(p) for p in parts)
    s, b = s.view(mx.bfloat16), b.view(mx.bfloat16)
    dq = np.array(mx.dequantize(wq, s, b, group_size=spec.group_size, bits=spec.bits).astype(mx.float32))
    return float((imp * (dq - x) ** 2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_weighted_search_beats_min_max_on_weighted_error(bits):
    spec = QuantSpec(bits, 64)
    x = (RNG.normal(size=(64, 256)) * RNG.uniform(0.1, 2, size=256)).astype(np.float32)
    imp = (RNG.uniform(size=256) ** 4).astype(np.float32)
    plain = weighted_error(x, imp, quantize(x, spec, "bfloat16"), spec)
    searched = weighted_error(x, imp, quantize(x, spec, "bfloat16", imp, weighted=True), spec)
    assert searched < 0.9 * plain
    ones = np.ones(256, np.float32)  # no imatrix: a plain MSE search, still no worse than min/max
    mse = weighted_error(x, ones, quantize(x, spec, "bfloat16", None, weighted=True), spec)
    assert mse <= weighted_error(x, ones, quantize(x, spec, "bfloat16"), spec)


def test_weighted_search_handles_constant_and_per_expert_groups():
    x = np.zeros((2, 3, 64), np.float32)
    x[1] = 0.5
    imp = np.ones((2, 1, 64), np.float32)
    codes, s, b = weighted_search(mx.array(x), mx.array(imp), QuantSpec(4, 64), mx.float32)
    dq = mx.dequantize(pack(codes, 4), s, b, group_size=64, bits=4)
    assert np.allclose(np.array(dq), x)


UNSLOTH_4 = {
    "language_model.model.layers.0.mlp.switch_mlp.gate_proj": 4,
    "language_model.model.layers.0.mlp.switch_mlp.up_proj": 4,
    "language_model.model.layers.0.mlp.switch_mlp.down_proj": 5,
    "language_model.model.layers.0.mlp.shared_expert.up_proj": 4,
    "language_model.model.layers.0.mlp.shared_expert.down_proj": 5,
    "language_model.model.layers.0.mlp.down_proj": 5,
    "language_model.model.layers.0.mlp.gate_proj": 4,
    "language_model.model.layers.3.self_attn.q_proj": 6,
    "language_model.model.layers.3.self_attn.v_proj": 6,
    "language_model.model.layers.0.linear_attn.in_proj_qkv": 6,
    "language_model.model.layers.0.linear_attn.in_proj_z": 6,
    "language_model.model.layers.3.self_attn.o_proj": 8,
    "language_model.model.layers.0.linear_attn.out_proj": 8,
    "language_model.model.layers.0.linear_attn.in_proj_a": 8,
    "language_model.model.layers.0.linear_attn.in_proj_b": 8,
    "language_model.model.layers.0.mlp.gate": 8,
    "language_model.model.layers.0.mlp.shared_expert_gate": 8,
    "language_model.model.embed_tokens": 6,
    "language_model.lm_head": 8,  # d + 3 = 7 is not an MLX width: rounds up
}


def test_unsloth_recipe():
    recipe = load_recipe("unsloth")
    for module, bits in UNSLOTH_4.items():
        assert recipe.spec(module, (256, 256), 4, 64) == QuantSpec(bits, 64), module
    assert recipe.spec("language_model.lm_head", (256, 256), 3, 64).bits == 6
    assert recipe.spec("language_model.model.layers.0.mlp.switch_mlp.down_proj", (8, 64, 256), 6, 64).bits == 8
    uniform = load_recipe("uniform")
    assert uniform.spec("language_model.lm_head", (256, 256), 4, 64).bits == 4
    assert uniform.spec("language_model.model.layers.0.mlp.gate", (8, 256), 4, 64).bits == 8


def test_group_size_falls_back_to_what_divides_the_input():
    assert fit_group_size(64, 256) == 64
    assert fit_group_size(64, 32) == 32
    assert fit_group_size(128, 192) == 64
    assert fit_group_size(64, 48) is None
    recipe = load_recipe("uniform")
    assert recipe.spec("x.down_proj", (8, 64, 32), 4, 64) == QuantSpec(4, 32)
    assert recipe.spec("x.down_proj", (8, 64, 48), 4, 64) is None


def test_user_recipe_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("rules:\n  - {match: '*.switch_mlp.*', bits: 'max(d-1, 2)', group_size: 32}\n"
                 "  - {match: '*lm_head', bits: none}\n  - {match: '*', bits: 8}\n")
    recipe = load_recipe(str(f))
    assert recipe.name == "mine"
    assert recipe.spec("a.mlp.switch_mlp.up_proj", (8, 64, 256), 3, 64) == QuantSpec(2, 32)
    assert recipe.spec("language_model.lm_head", (256, 256), 3, 64) is None
    assert recipe.spec("a.self_attn.q_proj", (256, 256), 3, 64) == QuantSpec(8, 64)


@pytest.mark.parametrize("text,match", [
    ("rules: []", "non-empty"),
    ("rules:\n  - {match: '*', bits: 'd + __import__(1)'}", "may use only"),
    ("rules:\n  - {match: '*', bits: 1}", "not supported"),
    ("rules:\n  - {match: '*', bits: 4, colour: red}", "unknown key 'colour'"),
    ("rules:\n  - {match: '*', bits: 4, group_size: 16}", "group_size"),
    ("rules: [", "not valid YAML"),
])
def test_bad_recipes(text, match):
    with pytest.raises(ConvertError, match=match):
        parse_recipe(text, "bad.yaml")


def test_unknown_recipe_name():
    with pytest.raises(ConvertError, match="unknown recipe 'fancy'.*uniform"):
        load_recipe("fancy")


# ---- quantised conversions ------------------------------------------------------------------


@cache
def quantised(name: str, kind: str, root: str, recipe: str = "unsloth") -> Path:
    fx = get_fixture(name)
    src = fx.gguf_path() if kind == "gguf" else fx.hf_dir
    return convert(src, Path(root) / f"{name}-{kind}-{recipe}", quantize=True, q_recipe=recipe, progress=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("quantised"))


def ours_tokenizer(path):
    from model.loader import load_tokenizer

    return load_tokenizer(path)


def greedy(model, ids, n):
    ids = [int(i) for i in ids]
    for _ in range(n):
        ids.append(int(np.array(model(mx.array(ids)[None], last_only=True)[0, -1]).argmax()))
    return ids[-n:]


@pytest.mark.parametrize("name,kind", [("moe_r4", "gguf"), ("dense_r2_tied", "gguf"), ("moe_r3_fa2", "hf")])
def test_quantised_conversion_loads_in_both_loaders_and_generates(name, kind, root):
    from mlx_lm import load as mlx_load
    from mlx_lm.utils import load_model as mlx_load_model

    fx = get_fixture(name)
    out = quantised(name, kind, root)
    ours_model = load_model(out, dtype="float32")
    prompt = mx.array(fx.prompt_ids[:32])[None]  # quantised vocabulary matmuls are slow on the CPU backend
    ours = np.array(ours_model(prompt).astype(mx.float32))[0]
    if name == "moe_r4":  # the whole of mlx_lm.load once (tokenizer included); its model loader elsewhere
        theirs_model, tok = mlx_load(str(out))
        assert tok.encode("What is 6 * 8?") == list(ours_tokenizer(out).encode("What is 6 * 8?"))
    else:
        theirs_model, _ = mlx_load_model(out)
    theirs_model.set_dtype(mx.float32)
    theirs = np.array(theirs_model(prompt).astype(mx.float32))[0]
    cos = (ours * theirs).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(theirs, axis=-1))
    assert cos.min() >= 0.99
    assert (ours.argmax(-1) == fx.ref_logits[:32].argmax(-1)).mean() >= 0.8
    new = greedy(ours_model, fx.prompt_ids, 4)
    assert new[0] == fx.greedy_ids[0]


def test_quantisation_config_follows_the_recipe(root):
    out = quantised("moe_r4", "gguf", root)
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["bits"] == 4 and q["group_size"] == 64 and q["mode"] == "affine"
    assert q["language_model.model.embed_tokens"]["bits"] == 6
    assert q["language_model.lm_head"]["bits"] == 8
    assert q["language_model.model.layers.0.mlp.gate"]["bits"] == 8
    # moe_intermediate_size 32 < 64: down_proj falls back to groups of 32
    assert q["language_model.model.layers.0.mlp.switch_mlp.down_proj"] == {"group_size": 32, "bits": 5, "mode": "affine"}
    assert "language_model.model.layers.0.mlp.switch_mlp.gate_proj" not in q  # the default
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "language_model.model.layers.0.linear_attn.conv1d.scales" not in index
    assert "language_model.model.layers.0.input_layernorm.scales" not in index


def test_report_sizes_are_right(root):
    out = quantised("moe_r4", "gguf", root)
    summary = json.loads((out / "convert_report.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    data = 0
    for f in out.glob("model-*.safetensors"):
        raw = f.read_bytes()
        data += len(raw) - 8 - int.from_bytes(raw[:8], "little")
    assert summary["total_bytes"] == data == index["metadata"]["total_size"]
    fx = get_fixture("moe_r4")
    from safetensors import safe_open

    with safe_open(fx.hf_dir / "model.safetensors", "np") as f:
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert summary["params"] == params and summary["bf16_bytes"] == 2 * params
    rows = {(r["class"], r["bits"]): r for r in summary["rows"]}
    experts = rows[("experts gate/up", 4)]
    e, i, h = 8, 32, 64
    n = 2 * 8 * e  # gate and up of 8 layers
    assert experts["params"] == n * i * h
    assert experts["bytes"] == n * (i * h * 4 // 8 + 2 * (i * h // 64) * 2)  # packed + bf16 scales, biases
    text = (out / "convert_report.md").read_text()
    assert "| experts gate/up | 4 | 64 |" in text and "Total:" in text and "BF16:" in text


def test_an_unquantised_mlx_directory_can_be_quantised(tmp_path):
    fx = get_fixture("dense_r2_tied")
    mlx_dir = convert(fx.hf_dir, tmp_path / "float", dtype="bfloat16", progress=False)
    out = convert(mlx_dir, tmp_path / "q", quantize=True, progress=False)
    direct = convert(fx.hf_dir, tmp_path / "direct", quantize=True, progress=False)
    for f in direct.glob("model-*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()
    with pytest.raises(ConvertError, match="already quantised"):
        convert(out, tmp_path / "again", quantize=True, progress=False)
