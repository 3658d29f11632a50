"""The committed demo GGUF: small, a qwen35moe laid out as llama.cpp lays it out, carrying its
tokenizer (Qwen's special tokens single, qwen35 pre-tokenizer) and the real Qwen3.5 chat template."""

from __future__ import annotations

import hashlib
import json

import pytest

from model.demo import DEMO_GGUF
from demo.tokenizer import CONTROL_TOKENS, MARKUP_TOKENS

import gguf

MAX_BYTES = 20 * 10**6


@pytest.fixture(scope="module")
def reader():
    return gguf.GGUFReader(DEMO_GGUF)


def test_size_and_build_records(reader):
    """The short record ships beside the GGUF; the full one stays in demo/, where --init finds it."""
    from demo.build import _build_info_of

    size = DEMO_GGUF.stat().st_size
    assert size <= MAX_BYTES
    sha256 = hashlib.sha256(DEMO_GGUF.read_bytes()).hexdigest()
    short = DEMO_GGUF.parent / "build.json"
    record = json.loads(short.read_text())
    assert len(short.read_text().splitlines()) < 60
    assert (record["gguf_sha256"], record["gguf_bytes"]) == (sha256, size)
    assert not (DEMO_GGUF.parent / "build_info.json").exists()
    full = _build_info_of(DEMO_GGUF, sha256)
    assert full is not None and full["gguf_bytes"] == size
    assert full.get("loss_history") or full["mtp_train"]["loss_history"]  # a training run, or the MTP head's
    chain, build = [], full
    while build:
        chain.insert(0, build["command"])
        build = build.get("init_build")
    assert record["commands"] == chain
    assert all(c.startswith("python") and ("demo.build" in c or "demo.train_mtp" in c) for c in chain)


def test_architecture_and_tensor_types(reader):
    f = reader.fields
    assert f["general.architecture"].contents() == "qwen35moe"
    assert f["general.file_type"].contents() == 32  # MOSTLY_BF16
    arch = "qwen35moe."
    n_layers = f[arch + "block_count"].contents()
    recurrent = f[arch + "attention.recurrent_layers"].contents()
    assert len(recurrent) == n_layers and not all(recurrent) and any(recurrent)
    assert f[arch + "expert_used_count"].contents() == 2
    names = {t.name: t for t in reader.tensors}
    assert names["blk.0.ffn_gate_exps.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert names["blk.0.ssm_a"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "output.weight" in names and "token_embd.weight" in names


def test_tokenizer_and_template(reader):
    from demo.corpus import chat_template

    f = reader.fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.pre"].contents() == "qwen35"
    assert f["tokenizer.chat_template"].contents() == chat_template()
    tokens = f["tokenizer.ggml.tokens"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    for t in CONTROL_TOKENS + MARKUP_TOKENS:
        assert tokens.count(t) == 1
        assert types[tokens.index(t)] == (gguf.TokenType.CONTROL if t in CONTROL_TOKENS else gguf.TokenType.USER_DEFINED)
    assert tokens[f["tokenizer.ggml.eos_token_id"].contents()] == "<|im_end|>"
    assert tokens[f["tokenizer.ggml.padding_token_id"].contents()] == "<|endoftext|>"
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert int(embd.shape[1]) == len(tokens)


def test_the_mtp_head_is_laid_out_as_llama_cpp_writes_it(reader):
    f = reader.fields
    n_mtp = f["qwen35moe.nextn_predict_layers"].contents()
    n = f["qwen35moe.block_count"].contents() - n_mtp
    assert n_mtp == 1 and f["qwen35moe.attention.recurrent_layers"].contents()[n:] == [False]
    names = {t.name for t in reader.tensors}
    for name in ("eh_proj", "enorm", "hnorm", "shared_head_norm"):
        assert f"blk.{n}.nextn.{name}.weight" in names
    assert f"blk.{n}.attn_q.weight" in names and f"blk.{n}.ffn_gate_exps.weight" in names


def test_the_served_demo_drafts_with_its_trained_head(tmp_path):
    """Converted as `deltaserve serve` converts it, the demo carries its MTP head, and in the engine at
    depth 3 its drafts are often accepted, chained ones too, its output that of plain decoding. On these
    two prompts: 15/23, 4/22, 2/20 per draft position (the head trained without chaining: 16/27, 1/25,
    1/23; a trial head after 2 training steps: 2% / 0% / 0%); demo/README.md has 16 conversations."""
    from convert import convert
    from demo import corpus
    from demo.train_mtp import acceptance, prompts_of
    from model import load
    from tokenizers import Tokenizer

    out = convert(DEMO_GGUF, tmp_path / "demo", dtype="float32", progress=False)
    lm = load(out, dtype="float32")
    assert lm[0].config.mtp_num_hidden_layers == 1
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    prompts = [ids for ids, _ in prompts_of(tok, corpus.generate("heldout", 2, reasoning="lookup"))]
    acc = acceptance(lm, prompts, 24)
    assert acc["same_as_plain"] and acc["drafted"][0] >= 10 and acc["rate"][0] >= 0.3, acc
    assert acc["accepted"][1] >= 2, acc
