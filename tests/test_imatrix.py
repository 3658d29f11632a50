"""Importance matrices: llama.cpp's real GGUF imatrix and the legacy .dat format, name and shape
checks, AWQ pre-scaling (float model unchanged), and what imatrix guidance does to quantisation
error (validate's KLD and top-1)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from fixtures import get_fixture

from convert import ConvertError, convert
from convert.gguf_inverse import BLOCK, Geometry, v_head_order
from convert.imatrix import Entry, map_to_model, read_imatrix, write_gguf, write_legacy
from convert.source import open_source
from model import load_model

REAL = Path("/work/shared/fixtures/imatrix-tiny")
SHARED_REAL = REAL / "imatrix.gguf"
needs_real = pytest.mark.skipif(not SHARED_REAL.exists(), reason="no /work/shared/fixtures/imatrix-tiny")
CALIB = REAL / "calib.txt"


def rel_err(ours, ref):
    return (np.abs(ours - ref).max(-1) / (ref.max(-1) - ref.min(-1))).max()


def logits(path, ids):
    return np.array(load_model(path, dtype="float32")(mx.array(ids)[None]).astype(mx.float32))[0]


# ---- llama.cpp's own imatrix ------------------------------------------------------------------


@needs_real
def test_reads_llama_cpp_gguf_imatrix():
    im = read_imatrix(SHARED_REAL)
    assert not im.legacy and im.chunks == 8 and im.datasets == ["calib.txt"]
    assert len(im.entries) == 51
    experts = im.entries["blk.0.ffn_gate_exps.weight"]
    assert experts.sum2.shape == (8, 64) and experts.counts.shape == (8,)
    assert experts.counts.sum() == 2 * 1024  # top-2 routing over 8 chunks of 128 tokens
    shared = im.entries["blk.3.attn_q.weight"]
    assert shared.sum2.shape == (1, 64) and shared.counts.tolist() == [1024]
    assert (experts.importance() > 0).all()


def _build_tiny_real(dest: Path) -> None:
    import torch
    from fixtures.llamacpp import convert_hf_to_gguf
    from fixtures.tokenizer import install_tokenizer
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    dest.mkdir()
    config = Qwen3_5MoeTextConfig.from_pretrained(REAL)
    torch.manual_seed(0)
    Qwen3_5MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(dest / "tiny")
    install_tokenizer(dest / "tiny")
    convert_hf_to_gguf(dest / "tiny", dest / "tiny.gguf", "bf16")


@pytest.fixture(scope="module")
def tiny_real_model():
    """A random model with exactly the config the real imatrix was computed for, as llama.cpp's GGUF
    (built once into the fixture cache)."""
    from fixtures.store import build_once, cache_root, digest, source_digest

    if not SHARED_REAL.exists():
        pytest.skip("no /work/shared/fixtures/imatrix-tiny")
    key = digest((REAL / "config.json").read_text(), source_digest("tokenizer.py", "llamacpp.py"), "seed 0")
    return build_once(cache_root() / f"imatrix-tiny-model-{key}", _build_tiny_real) / "tiny.gguf"


def test_real_imatrix_maps_onto_a_model_of_its_config(tiny_real_model):
    source = open_source(tiny_real_model)
    try:
        mapped = map_to_model(read_imatrix(SHARED_REAL), source.geometry, source.shapes())
    finally:
        source.close()
    assert len(mapped) == 51
    g = source.geometry
    raw = read_imatrix(SHARED_REAL).entries["blk.1.ssm_out.weight"].sum2
    perm = (v_head_order(g.k_heads, g.v_heads, g.v_dim))
    ours = mapped["language_model.model.layers.1.linear_attn.out_proj.weight"].sum2
    np.testing.assert_array_equal(ours, raw[:, perm])  # tiled GGUF columns back to grouped order
    assert mapped["language_model.model.layers.0.mlp.switch_mlp.down_proj.weight"].sum2.shape == (8, 32)


def test_quantised_conversion_with_real_imatrix_loads_and_generates(tiny_real_model, tmp_path):
    from mlx_lm.utils import load_model as mlx_load_model

    out = convert(tiny_real_model, tmp_path / "q", quantize=True, imatrix_path=SHARED_REAL, awq_alpha="auto",
                  progress=False)
    report = (out / "convert_report.md").read_text()
    assert "imatrix: imatrix.gguf: 51 tensors" in report and "importance-weighted" in report
    assert "AWQ pre-scaling: alpha auto" in report
    model = load_model(out)
    ids = [int(i) for i in get_fixture("moe_r4").prompt_ids]
    for _ in range(3):
        ids.append(int(np.array(model(mx.array(ids)[None], last_only=True)[0, -1]).argmax()))
    mlx_model, _ = mlx_load_model(out)
    assert mlx_model(mx.array(ids[-8:])[None]).shape[-1] == 151936


@needs_real
def test_imatrix_of_another_model_is_refused(tmp_path):
    with pytest.raises(ConvertError, match=r"blk\.0\.ffn_down_shexp\.weight.*\[1, 32\].*\[1, 64\]"):
        convert(get_fixture("moe_r4").gguf_path(), tmp_path / "a", quantize=True, imatrix_path=SHARED_REAL,
                progress=False)
    with pytest.raises(ConvertError, match=r"blk\.0\.ffn_down_exps\.weight.*not in this model"):
        convert(get_fixture("dense_r2_tied").gguf_path(), tmp_path / "b", quantize=True, imatrix_path=SHARED_REAL,
                progress=False)
    with pytest.raises(ConvertError, match="not an imatrix"):
        convert(get_fixture("dense_r2_tied").gguf_path(), tmp_path / "c", quantize=True,
                imatrix_path=get_fixture("moe_r1_tied").gguf_path(), progress=False)
    (tmp_path / "junk.dat").write_bytes(b"\x07\x00\x00\x00garbage")
    with pytest.raises(ConvertError, match="junk.dat"):
        convert(get_fixture("dense_r2_tied").gguf_path(), tmp_path / "d", quantize=True,
                imatrix_path=tmp_path / "junk.dat", progress=False)
    assert not any((tmp_path / d / "config.json").exists() for d in "abcd")


@needs_real
def test_legacy_dat_round_trip(tmp_path, tiny_real_model):
    real = read_imatrix(SHARED_REAL)
    write_legacy(tmp_path / "im.dat", real.entries, chunks=8, dataset="calib.txt")
    legacy = read_imatrix(tmp_path / "im.dat")
    assert legacy.legacy and legacy.chunks == 8 and legacy.datasets == ["calib.txt"]
    source = open_source(tiny_real_model)
    try:
        a = map_to_model(real, source.geometry, source.shapes())
        b = map_to_model(legacy, source.geometry, source.shapes())
    finally:
        source.close()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k].importance(), a[k].importance(), rtol=1e-6)


# ---- imatrices for the fixtures ---------------------------------------------------------------


def gguf_names(g: Geometry) -> dict[str, str]:
    """Our module path -> llama.cpp's tensor name (the inverse of the table)."""
    names = {}
    for n in range(g.n_layers):
        for rule in BLOCK:
            names[f"language_model.model.layers.{n}.{rule.ours}"] = f"blk.{n}.{rule.gguf}"
    return names


def random_imatrix(source, path: Path, seed: int = 0) -> Path:
    """Importances spread over four decades for every matmul weight: stresses AWQ's scaling."""
    rng = np.random.default_rng(seed)
    names = gguf_names(source.geometry)
    entries = {}
    for name, shape in source.shapes().items():
        if name in names and len(shape) >= 2 and ".conv1d." not in name:
            n_mat = shape[0] if len(shape) == 3 else 1
            counts = rng.integers(1, 500, n_mat).astype(np.float64)
            entries[names[name]] = Entry(10 ** rng.uniform(-2, 2, (n_mat, shape[-1])) * counts[:, None], counts)
    write_gguf(path, entries)
    return path


class _Tap(nn.Module):
    """Wraps a linear (or expert) layer and sums its squared inputs per input column."""

    def __init__(self, inner, stats, name):
        super().__init__()
        self.inner = inner
        self._stats, self._name = stats, name

    def __call__(self, x, indices=None, sorted_indices=False):
        xf = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1]).astype(np.float64)
        if indices is None:
            self._add(np.zeros(len(xf), int), xf, 1)
            return self.inner(x)
        idx = np.array(indices).reshape(-1)
        xf = np.repeat(xf, len(idx) // len(xf), axis=0)  # unsorted path: one x per token, k experts
        self._add(idx, xf, self.inner.weight.shape[0])
        return self.inner(x, indices, sorted_indices)

    def _add(self, idx, xf, n_mat):
        sum2, counts = self._stats.setdefault(self._name, (np.zeros((n_mat, xf.shape[1])), np.zeros(n_mat)))
        np.add.at(sum2, idx, xf**2)
        np.add.at(counts, idx, 1)


def collect_imatrix(model_dir: Path, text: str, path: Path, window: int = 128, chunks: int = 8) -> Path:
    """What llama-imatrix computes (sum of squared inputs and token counts per matmul, per expert),
    from our MLX model over a text; written in llama.cpp's GGUF imatrix format."""
    from model.loader import load_tokenizer

    model = load_model(model_dir, dtype="float32")
    g = Geometry.from_config(json.loads((model_dir / "config.json").read_text()))
    names = gguf_names(g)
    stats = {}
    for n, layer in enumerate(model.layers):
        for path_, parent, attr in _linear_leaves(layer):
            full = f"language_model.model.layers.{n}.{path_}.weight"
            setattr(parent, attr, _Tap(getattr(parent, attr), stats, full))
    ids = load_tokenizer(model_dir).encode(text, add_special_tokens=False)[: window * chunks]
    for a in range(0, len(ids) - window + 1, window):
        mx.eval(model(mx.array(ids[a:a + window])[None]))
    entries = {}
    perm = v_head_order(g.k_heads, g.v_heads, g.v_dim)
    for name, (sum2, counts) in stats.items():
        if name.endswith("linear_attn.out_proj.weight"):  # our grouped V columns -> GGUF's tiled order
            tiled = np.empty_like(sum2)
            tiled[:, perm] = sum2
            sum2 = tiled
        entries[names[name]] = Entry(sum2, counts)
    write_gguf(path, entries, chunks=len(ids) // window, chunk_size=window)
    return path


def _linear_leaves(layer):
    mixer = ("linear_attn", ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")) if layer.is_linear \
        else ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
    for attr in mixer[1]:
        yield f"{mixer[0]}.{attr}", getattr(layer, mixer[0]), attr
    mlp = layer.mlp
    if hasattr(mlp, "switch_mlp"):
        yield "mlp.gate", mlp, "gate"
        yield "mlp.shared_expert_gate", mlp, "shared_expert_gate"
        for attr in ("gate_proj", "up_proj", "down_proj"):
            yield f"mlp.switch_mlp.{attr}", mlp.switch_mlp, attr
            yield f"mlp.shared_expert.{attr}", mlp.shared_expert, attr
    else:
        for attr in ("gate_proj", "up_proj", "down_proj"):
            yield f"mlp.{attr}", mlp, attr


@cache
def float_reference(name: str, root: str) -> Path:
    return convert(get_fixture(name).gguf_path(), Path(root) / f"{name}-f32", dtype="float32", progress=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("imatrix"))


@pytest.mark.parametrize("name,kind", [("moe_r4", "gguf"), ("dense_r2_tied", "hf"), ("moe_r3_fa2", "gguf")])
def test_awq_prescaling_keeps_the_float_model(name, kind, root, tmp_path):
    fx = get_fixture(name)
    src = fx.gguf_path() if kind == "gguf" else fx.hf_dir
    source = open_source(src)
    try:
        imatrix = random_imatrix(source, tmp_path / "im.gguf")
    finally:
        source.close()
    out = convert(src, tmp_path / "awq", dtype="float32", imatrix_path=imatrix, awq_alpha=1.0, progress=False)
    plain = logits(float_reference(name, root), fx.prompt_ids)
    scaled = logits(out, fx.prompt_ids)
    assert rel_err(scaled, plain) <= 1e-5
    # and the scaling really happened, to norms, consumers and (MoE) up/down pairs
    from safetensors.numpy import load_file

    norm = "language_model.model.layers.0.post_attention_layernorm.weight"
    a = load_file(next((out).glob("model-*.safetensors")))[norm]
    b = load_file(next(float_reference(name, root).glob("model-*.safetensors")))[norm]
    assert not np.allclose(a, b)
    groups = (out / "convert_report.md").read_text()
    assert "AWQ pre-scaling: alpha 1.0" in groups


@pytest.fixture(scope="module")
def fixture_imatrix(tmp_path_factory, root):
    path = tmp_path_factory.mktemp("collected") / "moe_r4.imatrix.gguf"
    return collect_imatrix(float_reference("moe_r4", root), CALIB.read_text(), path)


def test_collected_imatrix_has_llama_cpp_names(fixture_imatrix):
    im = read_imatrix(fixture_imatrix)
    assert "blk.0.ffn_up_exps.weight" in im.entries and "blk.3.attn_q.weight" in im.entries
    assert im.entries["blk.0.ffn_up_exps.weight"].counts.sum() == 2 * im.entries["blk.0.ffn_gate_inp.weight"].counts[0]


def test_imatrix_guidance_lowers_kld(fixture_imatrix, root, tmp_path, capsys):
    """The four configurations the issue asks validate to report; each imatrix use must help."""
    import argparse

    from convert.cli import register

    fx = get_fixture("moe_r4")
    src = fx.gguf_path()
    configs = {
        "uniform 4-bit": dict(q_recipe="uniform"),
        "unsloth 4-bit": dict(q_recipe="unsloth"),
        "unsloth 4-bit + AWQ": dict(imatrix_path=fixture_imatrix, awq_alpha="auto", weighted_scales=False),
        "unsloth 4-bit + AWQ + weighted scales": dict(imatrix_path=fixture_imatrix, awq_alpha="auto"),
    }
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    kld = {}
    for label, opts in configs.items():
        out = convert(src, tmp_path / label.replace(" ", "_"), quantize=True, progress=False, **opts)
        structural = label.endswith("weighted scales")  # the tensor check once, with AWQ to undo
        args = parser.parse_args(["validate", str(out), "--reference", str(float_reference("moe_r4", root)),
                                  "--text", str(CALIB), "--max-tokens", "160", "--threshold", "0.99"]
                                 + ([] if structural else ["--no-structural"]))
        assert args.func(args) == 0
        printed = capsys.readouterr().out
        assert "top-1 agreement" in printed
        assert "structural: ok" in printed or not structural
        line = next(x for x in printed.splitlines() if x.startswith("functional:"))
        kld[label] = float(line.split("mean KLD ")[1].split(",")[0])
    print(kld)
    assert kld["uniform 4-bit"] > kld["unsloth 4-bit"]
    assert kld["unsloth 4-bit + AWQ"] < kld["unsloth 4-bit"]
    assert kld["unsloth 4-bit + AWQ + weighted scales"] < kld["unsloth 4-bit"]


def test_validate_catches_a_wrong_v_head_order(tmp_path, monkeypatch, capsys):
    """The peer converter's even/odd interleave is right only for r = 2; on r = 4 validate must fail."""
    from convert import gguf_inverse
    from convert.cli import main

    def interleave(k_heads, v_heads, d):  # as if r were 2 whatever it is
        heads = np.arange(v_heads).reshape(2, -1).T.reshape(-1)
        return (heads[:, None] * d + np.arange(d)).reshape(-1)

    monkeypatch.setattr(gguf_inverse, "v_head_order", interleave)
    fx = get_fixture("moe_r4")
    out = convert(fx.gguf_path(), tmp_path / "wrong", dtype="float32", progress=False)
    monkeypatch.undo()
    assert main(["validate", str(out), "--reference", str(fx.hf_dir)]) == 1
    printed = capsys.readouterr().out
    assert "linear-attention in_proj_qkv/z" in printed and "BELOW THRESHOLD" in printed
    assert "structural: FAIL" in printed
