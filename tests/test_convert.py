"""GGUF and HF checkpoints -> MLX directories: logits against transformers, mlx-lm, tokenizer, MTP,
split and quantised GGUFs, bad input, overwrite protection, the cache and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from fixtures import FIXTURES, GGUF_FIXTURES, get_fixture
from fixtures.build import PROMPT_MESSAGES
from fixtures.llamacpp import vocab_test_cases

from convert import ConvertError, cached_conversion, convert
from convert.gguf_reader import GGUFFile
from model import load, load_model

REPO = Path(__file__).resolve().parents[1]


def logits(model, ids):
    return np.array(model(mx.array(ids)[None]).astype(mx.float32))[0]


def rel_err(ours, ref):
    return (np.abs(ours - ref).max(-1) / (ref.max(-1) - ref.min(-1))).max()


@cache
def converted(name: str, kind: str, root: str) -> Path:
    """One float32 conversion per fixture and input kind, shared by the tests of this module."""
    fx = get_fixture(name)
    src = fx.gguf_path("bf16") if kind == "gguf" else fx.hf_dir
    return convert(src, Path(root) / f"{name}-{kind}", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("converted"))


CASES = [(n, "gguf") for n in GGUF_FIXTURES] + [(n, "hf") for n in FIXTURES]


@pytest.mark.parametrize("name,kind", CASES)
def test_float32_conversion_matches_transformers_and_mlx_lm(name, kind, root):
    from mlx_lm.utils import (
        load_model as mlx_load_model,  # mlx_lm.load minus its tokenizer
    )

    fx = get_fixture(name)
    out = converted(name, kind, root)
    ours = logits(load_model(out, dtype="float32"), fx.prompt_ids)
    assert rel_err(ours, fx.ref_logits) <= 1e-3
    mlx_lm_model, _ = mlx_load_model(out)
    mlx_lm_model.set_dtype(mx.float32)
    assert rel_err(logits(mlx_lm_model, fx.prompt_ids), fx.ref_logits) <= 1e-3


@pytest.mark.parametrize("name", GGUF_FIXTURES)
def test_output_layout(name, root):
    fx = get_fixture(name)
    out = converted(name, "gguf", root)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == ("qwen3_5_moe" if fx.spec.moe else "qwen3_5")
    for key in ("head_dim", "layer_types", "full_attention_interval", "eos_token_id"):
        assert cfg[key] == fx.config[key] or key == "eos_token_id", key
    assert cfg["rope_parameters"]["rope_theta"] == fx.config["rope_parameters"]["rope_theta"]
    assert fx.config["eos_token_id"] in cfg["eos_token_id"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i + 1}-of-0000{len(shards)}.safetensors" for i in range(len(shards))]
    weights = {}
    for s in shards:
        weights.update(mx.load(str(out / s)))
    assert weights.keys() == index["weight_map"].keys()
    for k, v in weights.items():
        if k.endswith(("norm.weight", "A_log", "dt_bias")):
            assert v.dtype == mx.float32, k
        if k.endswith("conv1d.weight"):
            assert v.shape[-1] == 1
    gen = json.loads((out / "generation_config.json").read_text())
    assert fx.config["eos_token_id"] in gen["eos_token_id"]
    assert "BF16" in (out / "convert_report.md").read_text()


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_tokenizer_round_trips_like_llama_cpp(kind, root):
    fx = get_fixture("moe_r4")
    _, tok = load(converted("moe_r4", kind, root), dtype="float32")
    ids = tok.apply_chat_template(PROMPT_MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids == fx.prompt_ids.tolist()
    # llama.cpp does not normalise; the Qwen3.5 tokenizer applies NFC, so compare NFC texts
    cases = [(t, e) for t, e in vocab_test_cases() if unicodedata.normalize("NFC", t) == t]
    assert len(cases) > 40
    for text, expected in cases:
        assert tok.encode(text, add_special_tokens=False) == expected, text
    assert tok.decode(fx.prompt_ids) == tok.decode(tok.encode(tok.decode(fx.prompt_ids), add_special_tokens=False))


def test_generation_config_and_chat_template_come_from_the_gguf(root):
    out = converted("moe_r4", "gguf", root)
    g = GGUFFile(get_fixture("moe_r4").gguf_path())
    try:
        template = g.get("tokenizer.chat_template")
    finally:
        g.close()
    assert (out / "chat_template.jinja").read_text() == template


def published_layout(name: str, dest: Path) -> Path:
    """The fixture's HF checkpoint as Qwen publishes it: model.language_model. prefix, fused experts,
    vision tower and MTP weights, two shards with an index, a wrapper config."""
    import shutil

    from model.loader import read_safetensors

    fx = get_fixture(name)
    cfg = fx.config
    shutil.copytree(fx.hf_dir, dest)
    weights, _ = read_safetensors(dest)
    weights = dict(weights)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}.mlp.experts"
        e = range(cfg["num_experts"])
        gate = mx.stack([weights.pop(f"{p}.{i}.gate_proj.weight") for i in e])
        up = mx.stack([weights.pop(f"{p}.{i}.up_proj.weight") for i in e])
        weights[f"{p}.gate_up_proj"] = mx.concatenate([gate, up], axis=1)
        weights[f"{p}.down_proj"] = mx.stack([weights.pop(f"{p}.{i}.down_proj.weight") for i in e])
    out = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v for k, v in weights.items()}
    out["model.visual.blocks.0.attn.qkv.weight"] = mx.zeros((3, 3), dtype=mx.bfloat16)
    h = cfg["hidden_size"]
    full = f"model.layers.{cfg['layer_types'].index('full_attention')}."  # the MTP layer has its shapes
    out.update({"mtp.layers.0." + k[len(full):]: v for k, v in weights.items() if k.startswith(full)})
    out["mtp.fc.weight"] = mx.ones((h, 2 * h), dtype=mx.bfloat16)
    out["mtp.pre_fc_norm_embedding.weight"] = mx.full((h,), 0.5, dtype=mx.bfloat16)
    out["mtp.pre_fc_norm_hidden.weight"] = mx.zeros((h,), dtype=mx.bfloat16)
    out["mtp.norm.weight"] = mx.zeros((h,), dtype=mx.bfloat16)
    out["mtp.layers.0.input_layernorm.weight"] = mx.zeros((h,), dtype=mx.bfloat16)
    for f in dest.glob("*.safetensors"):
        f.unlink()
    keys = sorted(out)
    index = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        mx.save_safetensors(str(dest / shard), {k: out[k] for k in part}, {"format": "pt"})
        index.update({k: shard for k in part})
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    wrapper = {"model_type": "qwen3_5_moe", "text_config": {**cfg, "model_type": "qwen3_5_moe_text"},
               "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}
    (dest / "config.json").write_text(json.dumps(wrapper))
    return dest


def test_published_hf_layout_with_mtp_and_vision(tmp_path):
    fx = get_fixture("moe_r3_fa2")
    src = published_layout("moe_r3_fa2", tmp_path / "published")
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert rel_err(logits(load_model(out), fx.prompt_ids), fx.ref_logits) <= 1e-3
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any("visual" in k for k in index)
    mtp = mx.load(str(out / index["mtp.fc.weight"]))
    assert mtp["mtp.fc.weight"].shape == (64, 128)
    norms = {k: v for f in set(index.values()) for k, v in mx.load(str(out / f)).items() if k.startswith("mtp.")}
    # MTP norms are zero-centred like the main ones: stored with the +1, as our layout holds them
    assert np.allclose(np.array(norms["mtp.pre_fc_norm_embedding.weight"]), 1.5)
    assert np.allclose(np.array(norms["mtp.layers.0.input_layernorm.weight"]), 1.0)


def test_float16_output(tmp_path):
    fx = get_fixture("dense_r2_tied")
    out = convert(fx.hf_dir, tmp_path / "f16", dtype="float16", progress=False)
    weights = mx.load(str(next(out.glob("model-*.safetensors"))))
    assert weights["language_model.model.embed_tokens.weight"].dtype == mx.float16
    assert weights["language_model.model.norm.weight"].dtype == mx.float32
    ours = logits(load_model(out, dtype="float32"), fx.prompt_ids)
    assert (ours.argmax(-1) == fx.ref_logits.argmax(-1)).all()


# ---- synthetic GGUFs: rewrite a fixture GGUF with edits -------------------------------------


def rewrite_gguf(src: Path, dst: Path, edit=None, arch=None, split_max_tensors: int = 0) -> Path:
    """Copy a GGUF through gguf-py's writer. edit(fields, tensors) may change both in place:
    fields[key] = (value, GGUFValueType, sub_type); tensors[name] = (array, GGMLQuantizationType)."""
    import gguf

    g = GGUFFile(src)
    try:
        head = g.header
        fields = {}
        for key, (vtype, pos) in head.raw_fields.items():
            if key.startswith(("GGUF.", "split.")):
                continue
            sub = None
            if vtype == gguf.GGUFValueType.ARRAY:
                sub = gguf.GGUFValueType(int.from_bytes(head.mm[pos:pos + 4], "little"))
            fields[key] = (head.value(key), gguf.GGUFValueType(vtype), sub)
        tensors = {}
        for name, t in g.tensors.items():
            raw = np.frombuffer(t.mm, np.uint8, count=t.nbytes, offset=t.offset).copy()
            tensors[name] = (raw.reshape(*t.np_shape[:-1], -1), t.qtype)
    finally:
        g.close()
    if edit:
        edit(fields, tensors)
    arch = arch or fields.pop("general.architecture")[0]
    fields.pop("general.architecture", None)
    w = gguf.GGUFWriter(str(dst), arch=arch, split_max_tensors=split_max_tensors)
    for key, (value, vtype, sub) in fields.items():
        w.add_key_value(key, value, vtype, sub)
    for name, (array, qtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def as_float(array, qtype):
    from gguf.quants import dequantize

    return dequantize(array, qtype)


def f32_tensor(x):
    import gguf

    x = np.ascontiguousarray(x, np.float32)
    return x.view(np.uint8).reshape(*x.shape[:-1], -1), gguf.GGMLQuantizationType.F32


def add_mtp_block(fields, tensors):
    """blk.{n}: a copy of the last full-attention block plus the nextn.* tensors llama.cpp writes."""
    import gguf

    arch = fields["general.architecture"][0]
    n = fields[f"{arch}.block_count"][0]
    full = max(int(k.split(".")[1]) for k in tensors if k.endswith("attn_q.weight"))
    rng = np.random.default_rng(0)
    for name in [k for k in tensors if k.startswith(f"blk.{full}.")]:
        tensors[name.replace(f"blk.{full}.", f"blk.{n}.", 1)] = tensors[name]
    hidden = fields[f"{arch}.embedding_length"][0]
    tensors[f"blk.{n}.nextn.eh_proj.weight"] = f32_tensor(rng.normal(0, 0.05, (hidden, 2 * hidden)))
    for norm in ("enorm", "hnorm", "shared_head_norm"):
        tensors[f"blk.{n}.nextn.{norm}.weight"] = f32_tensor(1 + rng.normal(0, 0.1, hidden))
    fields[f"{arch}.block_count"] = (n + 1, gguf.GGUFValueType.UINT32, None)
    fields[f"{arch}.nextn_predict_layers"] = (1, gguf.GGUFValueType.UINT32, None)
    recurrent = fields[f"{arch}.attention.recurrent_layers"]
    fields[f"{arch}.attention.recurrent_layers"] = (recurrent[0] + [False], *recurrent[1:])


def test_mtp_block_is_kept_under_mtp_names(tmp_path):
    from mlx_lm.utils import load_model as mlx_load_model

    fx = get_fixture("moe_r4")
    src = rewrite_gguf(fx.gguf_path(), tmp_path / "mtp.gguf", add_mtp_block)
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = sorted(k for k in index if k.startswith("mtp."))
    assert "mtp.fc.weight" in mtp and "mtp.layers.0.self_attn.q_proj.weight" in mtp
    assert {"mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight"} <= set(mtp)
    assert "mtp.layers.0.mlp.switch_mlp.gate_proj.weight" in mtp
    weights = mx.load(str(out / index["mtp.fc.weight"]))
    assert weights["mtp.fc.weight"].shape == (64, 128)
    layer7 = mx.load(str(out / index["language_model.model.layers.7.self_attn.q_proj.weight"]))
    assert mx.array_equal(weights["mtp.layers.0.self_attn.q_proj.weight"],
                          layer7["language_model.model.layers.7.self_attn.q_proj.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mtp_num_hidden_layers"] == 1 and cfg["num_hidden_layers"] == 8
    assert rel_err(logits(load_model(out, dtype="float32"), fx.prompt_ids), fx.ref_logits) <= 1e-3
    mlx_load_model(out)  # mlx-lm drops mtp.* and loads the rest

    qout = convert(src, tmp_path / "q", quantize=True, progress=False)
    qindex = json.loads((qout / "model.safetensors.index.json").read_text())["weight_map"]
    assert "mtp.layers.0.mlp.switch_mlp.gate_proj.scales" in qindex
    load_model(qout)


def test_split_gguf_gives_the_same_output(tmp_path, root):
    fx = get_fixture("moe_r3_fa2")
    rewrite_gguf(fx.gguf_path(), tmp_path / "split.gguf", split_max_tensors=25)
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) >= 3
    out = convert(parts[0], tmp_path / "out", dtype="float32", progress=False)
    whole = converted("moe_r3_fa2", "gguf", root)
    for f in sorted(whole.glob("model-*.safetensors")):
        assert (out / f.name).read_bytes() == f.read_bytes()
    with pytest.raises(ConvertError, match="first part"):
        convert(parts[1], tmp_path / "bad", progress=False)
    parts[-1].unlink()
    with pytest.raises(ConvertError, match="missing"):
        convert(parts[0], tmp_path / "bad", progress=False)


def requantise(qtype_name: str, names=lambda n: n.endswith("weight")):
    def edit(fields, tensors):
        import gguf
        from gguf.quants import quantize

        qtype = gguf.GGMLQuantizationType[qtype_name]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        for name, (array, src_type) in list(tensors.items()):
            x = as_float(array, src_type)
            if x.ndim >= 2 and x.shape[-1] % block == 0 and names(name):
                tensors[name] = (quantize(x, qtype), qtype)

    return edit


def test_quantised_gguf_source_is_read_with_a_warning(tmp_path):
    fx = get_fixture("dense_r2_tied")
    src = rewrite_gguf(fx.gguf_path(), tmp_path / "q8.gguf", requantise("Q8_0"))
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    report = (out / "convert_report.md").read_text()
    assert "Q8_0" in report and "compounds" in report
    ours = logits(load_model(out, dtype="float32"), fx.prompt_ids)
    assert rel_err(ours, fx.ref_logits) < 0.05
    assert (ours.argmax(-1) == fx.ref_logits.argmax(-1)).mean() >= 0.95


def test_k_quant_source_dequantises_like_gguf_py(tmp_path):
    import gguf
    from gguf.quants import dequantize

    fx = get_fixture("moe_r1_tied")
    src = rewrite_gguf(fx.gguf_path(), tmp_path / "q.gguf", requantise("Q8_0", lambda n: "ffn_up_exps" in n))
    g = GGUFFile(src)
    try:
        t = g.tensors["blk.0.ffn_up_exps.weight"]
        assert t.qtype == gguf.GGMLQuantizationType.Q8_0
        raw = np.frombuffer(t.mm, np.uint8, count=t.nbytes, offset=t.offset).reshape(*t.np_shape[:-1], -1)
        np.testing.assert_array_equal(np.array(g.lazy(t.name).rows(2, 5)), dequantize(raw, t.qtype)[2:5])
    finally:
        g.close()


# ---- bad input: one clear message, non-zero exit, no loadable directory ----------------------


def assert_refused(src, out, match):
    with pytest.raises(ConvertError, match=match):
        convert(src, out, progress=False)
    assert not (Path(out) / "config.json").exists()


def test_bad_gguf_files(tmp_path):
    good = get_fixture("moe_r1_tied").gguf_path().read_bytes()
    cases = {"empty.gguf": (b"", "empty file"),
             "magic.gguf": (b"GGML" + good[4:2000], "not a GGUF file"),
             "header.gguf": (good[:5000], "truncated"),
             "data.gguf": (good[: len(good) // 2], "truncated")}
    for name, (data, match) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert_refused(tmp_path / name, tmp_path / f"out-{name}", match)
        assert not (tmp_path / f"out-{name}").exists()
    assert_refused(tmp_path / "missing.gguf", tmp_path / "out", "no such file")


def test_unsupported_architecture_and_tensor_type(tmp_path):
    import gguf

    src = get_fixture("moe_r1_tied").gguf_path()

    def relabel(fields, tensors):
        fields = {k.replace("qwen35moe.", "llama."): v for k, v in fields.items()}

    rewrite_gguf(src, tmp_path / "llama.gguf", relabel, arch="llama")
    assert_refused(tmp_path / "llama.gguf", tmp_path / "o1", "unsupported architecture 'llama'")

    def int_tensor(fields, tensors):
        tensors["blk.0.ssm_a"] = (np.zeros(4, np.int32).view(np.uint8).reshape(-1), gguf.GGMLQuantizationType.I32)

    rewrite_gguf(src, tmp_path / "i32.gguf", int_tensor)
    assert_refused(tmp_path / "i32.gguf", tmp_path / "o2", r"type I32.*supported: F32, F16, BF16, .*Q8_0")


def test_bad_hf_directories(tmp_path):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(get_fixture("dense_r2_tied").hf_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    assert_refused(d, tmp_path / "o1", "unsupported model_type 'llama'")
    (d / "config.json").write_text(json.dumps(cfg))
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100_000])
    assert_refused(d, tmp_path / "o2", "truncated")
    f.unlink()
    assert_refused(d, tmp_path / "o3", "no \\*.safetensors")
    assert_refused(tmp_path / "nothing", tmp_path / "o4", "no such file")


def test_checkpoint_that_does_not_fit_its_config(tmp_path):
    import shutil

    d = tmp_path / "ckpt"
    shutil.copytree(get_fixture("dense_r2_tied").hf_dir, d)
    (f,) = d.glob("*.safetensors")
    weights = mx.load(str(f))
    key = "model.layers.0.linear_attn.in_proj_z.weight"
    weights[key] = weights[key][:-1]
    mx.save_safetensors(str(f), weights, {"format": "pt"})
    assert_refused(d, tmp_path / "o1", r"in_proj_z\.weight.* has shape \(63, 64\), expected \(64, 64\)")
    del weights["model.layers.1.linear_attn.A_log"]
    mx.save_safetensors(str(f), weights, {"format": "pt"})
    assert_refused(d, tmp_path / "o2", r"lacks tensor 'language_model\.model\.layers\.1\.linear_attn\.A_log'")


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_refused(get_fixture("moe_r1_tied").gguf_path(), blocker / "out", "cannot write|not a directory")


def test_refuses_to_overwrite_another_model(tmp_path, root):
    out = converted("moe_r1_tied", "gguf", root)
    stamp = (out / "config.json").stat().st_mtime_ns
    assert convert(get_fixture("moe_r1_tied").gguf_path(), out, dtype="float32", progress=False) == out
    assert (out / "config.json").stat().st_mtime_ns == stamp  # finished: nothing rewritten

    target = tmp_path / "taken"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(ConvertError, match="already holds a model.*--overwrite"):
        convert(get_fixture("dense_r2_tied").hf_dir, target, progress=False)
    convert(get_fixture("dense_r2_tied").hf_dir, target, dtype="float32", overwrite=True, progress=False)
    with pytest.raises(ConvertError, match="another conversion"):
        convert(get_fixture("dense_r2_tied").hf_dir, target, dtype="bfloat16", progress=False)
    load_model(target)


def test_cached_conversion_converts_once(tmp_path):
    src = get_fixture("dense_r2_tied").gguf_path()
    seen = []
    first = cached_conversion(src, cache_root=tmp_path, dtype="float32", progress=seen.append)
    assert seen and seen[-1].done_tensors == seen[-1].total_tensors
    files = {p: p.stat().st_mtime_ns for p in first.iterdir()}
    seen.clear()
    again = cached_conversion(src, cache_root=tmp_path, dtype="float32", progress=seen.append)
    assert again == first and not seen
    assert {p: p.stat().st_mtime_ns for p in again.iterdir()} == files
    other = cached_conversion(src, cache_root=tmp_path, dtype="bfloat16", progress=False)
    assert other != first and other.parent == first.parent
    load_model(other)


def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "convert", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env)


def test_cli(tmp_path):
    src = get_fixture("moe_r1_tied").hf_dir
    done = run_cli("convert", "--input", src, "--output", tmp_path / "out", "--quantize", "--q-bits", "4",
                   "--q-recipe", "uniform", "--shard-size", "3MB")
    assert done.returncode == 0, done.stderr
    assert "tensor class" in done.stdout and "Total:" in done.stdout
    assert "deltaserve convert: 100.0%" in done.stderr and "tensors" in done.stderr  # not a terminal: log lines
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
    load_model(tmp_path / "out")
    bad = run_cli("convert", "--input", tmp_path / "nope.gguf", "--output", tmp_path / "x")
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines() == [f"deltaserve convert: error: {tmp_path / 'nope.gguf'}: no such file or directory"]
    assert not (tmp_path / "x").exists()


def test_register_adds_subcommands():
    import argparse

    from convert.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["convert", "--input", "a.gguf", "--output", "o", "-q", "--shard-size", "2GiB"])
    assert args.func.__name__ == "run_convert" and args.shard_size == 2 * 2**30 and args.quantize
    args = parser.parse_args(["validate", "o", "--reference", "a.gguf"])
    assert args.func.__name__ == "run_validate" and args.threshold == 0.995
