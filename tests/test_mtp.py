"""The MTP head (model/mtp.py) against a torch reference, and its weights through every input.

transformers drops `mtp.*` and has no MTP module, vLLM and SGLang need a GPU, and llama.cpp's graph_mtp
needs a ~10-minute native build, so it is compared from committed rows (tests/test_mtp_reference.py,
two shapes, agreeing to 9.3e-7 of the row range). Here the reference logits (fixtures/mtp.py) come
from torch, written from REFERENCE.md section
10's formulas with the weights read from the checkpoint files and transformers' own trunk and
decoder-layer modules; they share no code with model/. The weights themselves are checked tensor by
tensor against llama.cpp's own converter run without --no-mtp.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from fixtures.mtp import MTP_FIXTURES, MTP_GGUF_FIXTURES, get_mtp_fixture

from convert import convert
from convert.recipes import load_recipe
from model import load_model
from model.config import ModelLoadError

FLOAT_TOL = 1e-5  # fp32 against fp32 from the same bf16 weights (measured <= 9e-7)
Q8_TOL = 0.05  # 8-bit affine trunk and head (measured 0.007 dense, 0.021 MoE)
# The first two fixtures run the whole 105-token prompt; the other shapes its first SHORT tokens, where
# the head's logits are the reference's first SHORT - 1 rows (it is causal): a few seconds a shape.
FULL_PROMPT = ("mtp_dense", "mtp_moe")
SHORT = 24


def rel_err(ours, ref):
    return (np.abs(ours - ref).max(-1) / (ref.max(-1) - ref.min(-1))).max()


def prompt(name: str) -> list[int]:
    ids = get_mtp_fixture(name).prompt_ids.tolist()
    return ids if name in FULL_PROMPT else ids[:SHORT]


def reference(name: str) -> np.ndarray:
    """The torch reference's rows for `prompt(name)`."""
    return get_mtp_fixture(name).ref_logits[: len(prompt(name)) - 1]


def mtp_logits(model, ids) -> np.ndarray:
    """Teacher-forced MTP logits over a prompt: position i reads h_i and token i+1, [T-1, V]."""
    t = mx.array(ids)[None]
    _, hidden = model(t, return_hidden=True)
    out, _ = model.draft(hidden[:, :-1], t[:, 1:], model.make_mtp_cache(1))
    return np.array(out.astype(mx.float32))[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mtp"))


@cache
def converted(name: str, kind: str, root: str) -> Path:
    fx = get_mtp_fixture(name)
    out = Path(root) / f"{name}-{kind}"
    if kind == "gguf":
        return convert(fx.gguf_path(), out, dtype="float32", progress=False)
    if kind == "q8":
        return convert(fx.hf_dir, out, dtype="float32", quantize=True, q_bits=8, progress=False)
    return convert(fx.hf_dir, out, dtype="float32", progress=False)


@pytest.mark.parametrize("name, kind", [(n, "hf") for n in MTP_FIXTURES] + [(n, "gguf") for n in MTP_GGUF_FIXTURES])
def test_mtp_logits_match_the_torch_reference(name, kind, root):
    """From the HF checkpoint as published, and from llama.cpp's GGUF through our converter."""
    fx = get_mtp_fixture(name)
    model = load_model(fx.hf_dir if kind == "hf" else converted(name, kind, root), dtype="float32")
    assert model.config.mtp_num_hidden_layers == 1
    assert rel_err(mtp_logits(model, prompt(name)), reference(name)) <= FLOAT_TOL


@pytest.mark.parametrize("name", MTP_FIXTURES)
def test_incremental_mtp_matches_the_reference(name):
    """The head's own KV cache: a prefill then one position at a time, as drafting runs it."""
    fx = get_mtp_fixture(name)
    model = load_model(fx.hf_dir, dtype="float32")
    ids = mx.array(prompt(name))[None]
    T, P = ids.shape[1], ids.shape[1] - 5
    _, hidden = model(ids, return_hidden=True)
    cache = model.make_mtp_cache(1)
    rows, _ = model.draft(hidden[:, :P], ids[:, 1 : P + 1], cache)
    outs = [rows]
    for i in range(P, T - 1):
        out, _ = model.draft(hidden[:, i : i + 1], ids[:, i + 1 : i + 2], cache)
        outs.append(out)
    assert cache.offsets == [T - 1]
    ours = np.array(mx.concatenate(outs, axis=1).astype(mx.float32))[0]
    assert rel_err(ours, reference(name)) <= FLOAT_TOL


@pytest.mark.parametrize("name", MTP_FIXTURES)
def test_quantized_mtp_logits(name, root):
    out = converted(name, "q8", root)
    quant = json.loads((out / "config.json").read_text())["quantization"]
    assert quant["bits"] == 8
    ours = mtp_logits(load_model(out, dtype="float32"), prompt(name))
    assert rel_err(ours, reference(name)) <= Q8_TOL


@pytest.mark.parametrize("recipe", ["unsloth", "uniform"])
def test_recipes_keep_the_mtp_head_at_8_bits(recipe):
    r = load_recipe(recipe)
    for module in ("mtp.fc", "mtp.layers.0.self_attn.q_proj", "mtp.layers.0.mlp.switch_mlp.gate_proj",
                   "mtp.layers.0.mlp.down_proj"):
        assert r.spec(module, (64, 128), 4, 64).bits == 8, module
    assert r.spec("language_model.model.layers.0.mlp.switch_mlp.gate_proj", (8, 32, 64), 4, 64).bits == 4


# llama.cpp's names for block n_layers (gguf-py's tensor map, conversion/qwen.py's remapper) -> ours
LLAMA_CPP_MTP = {
    "nextn.eh_proj.weight": "mtp.fc.weight",
    "nextn.enorm.weight": "mtp.pre_fc_norm_embedding.weight",
    "nextn.hnorm.weight": "mtp.pre_fc_norm_hidden.weight",
    "nextn.shared_head_norm.weight": "mtp.norm.weight",
    "attn_norm.weight": "mtp.layers.0.input_layernorm.weight",
    "post_attention_norm.weight": "mtp.layers.0.post_attention_layernorm.weight",
    "attn_q.weight": "mtp.layers.0.self_attn.q_proj.weight",
    "attn_k.weight": "mtp.layers.0.self_attn.k_proj.weight",
    "attn_v.weight": "mtp.layers.0.self_attn.v_proj.weight",
    "attn_output.weight": "mtp.layers.0.self_attn.o_proj.weight",
    "attn_q_norm.weight": "mtp.layers.0.self_attn.q_norm.weight",
    "attn_k_norm.weight": "mtp.layers.0.self_attn.k_norm.weight",
    "ffn_gate.weight": "mtp.layers.0.mlp.gate_proj.weight",
    "ffn_up.weight": "mtp.layers.0.mlp.up_proj.weight",
    "ffn_down.weight": "mtp.layers.0.mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mtp.layers.0.mlp.gate.weight",
    "ffn_gate_exps.weight": "mtp.layers.0.mlp.switch_mlp.gate_proj.weight",
    "ffn_up_exps.weight": "mtp.layers.0.mlp.switch_mlp.up_proj.weight",
    "ffn_down_exps.weight": "mtp.layers.0.mlp.switch_mlp.down_proj.weight",
    "ffn_gate_shexp.weight": "mtp.layers.0.mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mtp.layers.0.mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mtp.layers.0.mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mtp.layers.0.mlp.shared_expert_gate.weight",
}


@pytest.mark.parametrize("name", MTP_GGUF_FIXTURES)
def test_mtp_tensors_match_llama_cpp_converter(name, root):
    """HF -> MLX (our converter) against llama.cpp's convert_hf_to_gguf.py without --no-mtp: the
    same tensors after the same transforms (+1 on every zero-centred norm, experts split and stacked)."""
    fx = get_mtp_fixture(name)
    n_layers = fx.base.config["num_hidden_layers"]
    theirs, meta = fx.llama_cpp_mtp_block()
    arch = "qwen35moe" if fx.base.spec.moe else "qwen35"
    assert meta[f"{arch}.block_count"] == [n_layers + 1] and meta[f"{arch}.nextn_predict_layers"] == [1]

    out = converted(name, "hf", root)
    ours = {}
    for f in out.glob("model-*.safetensors"):
        ours.update({k: v for k, v in mx.load(str(f)).items() if k.startswith("mtp.")})
    assert set(theirs) <= set(LLAMA_CPP_MTP), set(theirs) - set(LLAMA_CPP_MTP)
    assert sorted(LLAMA_CPP_MTP[k] for k in theirs) == sorted(ours)
    for k, ref in theirs.items():
        mine = np.array(ours[LLAMA_CPP_MTP[k]].astype(mx.float32))
        np.testing.assert_array_equal(mine.reshape(ref.shape), ref, err_msg=k)
        assert mine.size == ref.size
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mtp_num_hidden_layers"] == 1 and cfg["num_hidden_layers"] == n_layers


def test_chained_drafts_feed_the_head_its_own_output():
    """K drafts: each runs the same layer on the previous draft's hidden_out and token, one position
    on; the head's cache grows by one per draft."""
    fx = get_mtp_fixture("mtp_moe")
    model = load_model(fx.hf_dir, dtype="float32")
    ids = mx.array(fx.prompt_ids.tolist())[None]
    T = ids.shape[1]
    logits, hidden = model(ids, return_hidden=True)
    cache = model.make_mtp_cache(1)
    token = mx.argmax(logits[:, -1:], axis=-1)  # the trunk's next token, t_T
    model.draft(hidden[:, :-1], ids[:, 1:], cache)  # the prompt's own positions
    h = hidden[:, -1:]
    for k in range(3):
        out, h = model.draft(h, token, cache)
        assert out.shape == (1, 1, fx.ref_logits.shape[-1]) and h.shape == (1, 1, 64)
        assert cache.offsets == [T + k]
        token = mx.argmax(out, axis=-1)


def test_declared_mtp_without_tensors_loads_the_trunk_only(tmp_path):
    """mlx-lm's conversions keep mtp_num_hidden_layers in config.json but drop the weights."""
    base = get_mtp_fixture("mtp_dense").base
    d = tmp_path / "no-mtp"
    shutil.copytree(base.hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "mtp_num_hidden_layers": 1}))
    model = load_model(d, dtype="float32")
    assert model.config.mtp_num_hidden_layers == 0 and "mtp" not in model


def test_incomplete_mtp_block_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    fx = get_mtp_fixture("mtp_dense")
    d = tmp_path / "partial"
    shutil.copytree(fx.hf_dir, d)
    (st,) = d.glob("*.safetensors")
    tensors = {k: v for k, v in load_file(st).items() if k != "mtp.norm.weight"}
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="mtp.norm.weight"):
        load_model(d)
    assert load_model(d, mtp=False).config.mtp_num_hidden_layers == 0
