"""The fixtures themselves: loadable, converted by llama.cpp, tokenised like llama.cpp, no near-ties."""

from __future__ import annotations

import threading
import time
import unicodedata
from functools import cache

import numpy as np
import pytest
from fixtures import FIXTURES, GGUF_FIXTURES, get_fixture
from fixtures.build import (
    MIN_ROUTER_LOGIT_GAP,
    MIN_ROUTER_PROB_GAP,
    MIN_TOP1_GAP,
    N_GREEDY,
    PROMPT_MESSAGES,
    router_margins,
    top1_gaps,
)
from fixtures.llamacpp import chat_template_path, vocab_test_cases
from fixtures.store import build_once
from fixtures.tokenizer import IM_END_ID, IM_START_ID, VOCAB_SIZE


@cache
def gguf_reader(name):
    """GGUFReader of the fixture's BF16 GGUF (parsing the 151,936-token vocabulary takes ~10 s)."""
    import gguf

    return gguf.GGUFReader(get_fixture(name).gguf_path())


@pytest.mark.parametrize("name", FIXTURES)
def test_hf_dir_loads_with_transformers(name):
    from safetensors import safe_open
    from transformers import AutoConfig

    fx = get_fixture(name)
    cfg = AutoConfig.from_pretrained(fx.hf_dir)
    assert cfg.model_type == ("qwen3_5_moe_text" if fx.spec.moe else "qwen3_5_text")
    assert cfg.vocab_size == VOCAB_SIZE and cfg.tie_word_embeddings == fx.spec.tied
    assert cfg.layer_types.count("full_attention") == fx.spec.layers // fx.spec.interval
    with safe_open(fx.hf_dir / "model.safetensors", "np") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
    assert ("lm_head.weight" in keys) != fx.spec.tied
    t = len(fx.prompt_ids)
    assert t > 64 + 16
    assert fx.ref_logits.shape == (t, VOCAB_SIZE) and fx.ref_logits.dtype == np.float32
    assert fx.greedy_ids.shape == (N_GREEDY,) and fx.greedy_logits.shape == (N_GREEDY, VOCAB_SIZE)


@pytest.mark.parametrize("name", FIXTURES)
def test_greedy_path_is_consistent(name):
    fx = get_fixture(name)
    assert np.array_equal(fx.greedy_logits.argmax(-1), fx.greedy_ids)
    np.testing.assert_allclose(fx.greedy_logits[0], fx.ref_logits[-1], atol=1e-4)


@pytest.mark.parametrize("name", FIXTURES)
def test_no_near_ties(name):
    fx = get_fixture(name)
    assert top1_gaps(fx.ref_logits).min() >= MIN_TOP1_GAP
    assert top1_gaps(fx.greedy_logits).min() >= MIN_TOP1_GAP
    if fx.spec.moe:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(fx.hf_dir, dtype=torch.float32).eval()
        ids = fx.prompt_ids.tolist() + fx.greedy_ids.tolist()[:-1]
        m = router_margins(model, ids, fx.config["num_experts_per_tok"])
        assert m["router_logit_gap"] >= MIN_ROUTER_LOGIT_GAP
        assert m["router_prob_gap"] >= MIN_ROUTER_PROB_GAP


@pytest.mark.parametrize("name", GGUF_FIXTURES)
def test_gguf_from_llamacpp_converter(name):
    from safetensors import safe_open

    fx = get_fixture(name)
    reader = gguf_reader(name)
    arch = "qwen35moe" if fx.spec.moe else "qwen35"
    assert reader.fields["general.architecture"].contents() == arch
    assert reader.fields[f"{arch}.block_count"].contents() == fx.spec.layers
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) != fx.spec.tied
    for i, kind in enumerate(fx.config["layer_types"]):
        mixer = ("ssm_a", "ssm_conv1d.weight", "attn_qkv.weight", "attn_gate.weight", "ssm_out.weight") \
            if kind == "linear_attention" else ("attn_q.weight", "attn_k.weight", "attn_output.weight")
        ffn = ("ffn_gate_exps.weight", "ffn_down_exps.weight", "ffn_gate_inp.weight", "ffn_up_shexp.weight") \
            if fx.spec.moe else ("ffn_gate.weight", "ffn_down.weight")
        for suffix in mixer + ffn:
            assert f"blk.{i}.{suffix}" in tensors, f"blk.{i}.{suffix}"

    # ssm_a = -exp(A_log), with V heads reordered from grouped (j*r + v) to tiled (v*Hk + j)
    hk, hv = fx.spec.k_heads, fx.spec.v_heads
    with safe_open(fx.hf_dir / "model.safetensors", "pt") as f:
        a_log = f.get_tensor("model.layers.0.linear_attn.A_log").float().numpy()
    tiled = a_log.reshape(hk, hv // hk).T.reshape(-1)
    np.testing.assert_allclose(np.asarray(tensors["blk.0.ssm_a"].data), -np.exp(tiled), rtol=1e-6)


def test_dkdv_fixture_has_no_gguf():
    fx = get_fixture("dense_r2_dkdv")
    assert fx.config["linear_key_head_dim"] != fx.config["linear_value_head_dim"]
    with pytest.raises(ValueError):
        fx.gguf_path()


def test_tokenizer_matches_llamacpp_vocab():
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf_dir = get_fixture(FIXTURES[0]).hf_dir
    tok = AutoTokenizer.from_pretrained(hf_dir)
    raw = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert len(tok) == VOCAB_SIZE
    compared = 0
    for text, expected in vocab_test_cases():
        ids = tok.encode(text, add_special_tokens=False)
        assert raw.encode(text, add_special_tokens=False).ids == ids, repr(text)
        if unicodedata.normalize("NFC", text) == text:  # llama.cpp does not NFC-normalise, Qwen3.5 does
            assert ids == expected, repr(text)
            compared += 1
    assert compared >= 45

    # the vocabulary llama.cpp's converter wrote into a fixture GGUF
    fields = gguf_reader(GGUF_FIXTURES[0]).fields
    tokens = fields["tokenizer.ggml.tokens"]
    ids = tok.encode("<|im_start|>user\nHello, world! 12 + 7?<|im_end|>", add_special_tokens=False)
    assert ids[0] == IM_START_ID and ids[-1] == IM_END_ID
    assert [bytes(tokens.parts[tokens.data[i]]).decode() for i in ids] == tok.convert_ids_to_tokens(ids)
    assert len(tokens.data) == VOCAB_SIZE
    assert fields["tokenizer.ggml.eos_token_id"].contents() == IM_END_ID


def test_chat_template_and_prompt():
    from transformers import AutoTokenizer

    fx = get_fixture(FIXTURES[0])
    assert (fx.hf_dir / "chat_template.jinja").read_text() == chat_template_path().read_text()
    tok = AutoTokenizer.from_pretrained(fx.hf_dir)
    ids = tok.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert list(ids) == fx.prompt_ids.tolist()
    assert tok.decode(fx.prompt_ids.tolist()).endswith("<|im_start|>assistant\n<think>\n")


def test_build_once_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        time.sleep(0.2)
        tmp.write_text("done")

    target = tmp_path / "artifact"
    threads = [threading.Thread(target=build_once, args=(target, build)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and target.read_text() == "done"
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["artifact"]

    def failing(tmp):
        tmp.write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        build_once(tmp_path / "other", failing)
    assert not (tmp_path / "other").exists()
    assert not list(tmp_path.glob(".other.tmp-*"))
