"""Our conversions open in mlx-lm and compute there what transformers computes: every fixture shape
through the conversion `serve --quantize` runs, checkpoints whose config lists layer_types without
full_attention_interval (mlx-lm builds its layers from the interval alone), and mlx_lm.generate's
command line. (Float32 conversions of every fixture meet transformers in mlx-lm in test_convert.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from fixtures import FIXTURES, get_fixture

from convert import cached_conversion, convert
from convert.gguf_reader import GGUFFile
from convert.gguf_writer import write_gguf

N = 32  # prompt positions compared: mlx-lm's forward costs ~20 ms a token on this CPU


def mlx_lm_logits(out, ids) -> np.ndarray:
    from mlx_lm.utils import load_model  # mlx_lm.load without its tokenizer (4 s each here)

    model, _ = load_model(out)
    model.set_dtype(mx.float32)
    return np.array(model(mx.array(ids)[None]).astype(mx.float32))[0]


def cosine(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("served")


def served(name: str, cache_root):
    """What `deltaserve serve MODEL --quantize` converts (and reuses): the GGUF where the fixture has one."""
    fx = get_fixture(name)
    return cached_conversion(fx.gguf_path() if fx.spec.gguf else fx.hf_dir, cache_root=cache_root,
                             quantize=True, progress=False)


@pytest.mark.parametrize("name", FIXTURES)
def test_quantised_conversion_matches_transformers_in_mlx_lm(name, cache_root):
    fx = get_fixture(name)
    out = served(name, cache_root)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["full_attention_interval"] == fx.spec.interval
    assert cfg["layer_types"] == fx.config["layer_types"]
    theirs, ref = mlx_lm_logits(out, fx.prompt_ids[:N]), np.asarray(fx.ref_logits[:N])
    assert cosine(theirs, ref).min() >= 0.98  # 4-bit (unsloth recipe); measured >= 0.99
    assert (theirs.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_layer_types_without_interval(kind, tmp_path):
    """transformers 5 saves layer_types but not full_attention_interval, and llama.cpp's converter
    then writes full_attention_interval 4 beside the real recurrent_layers (as convert/gguf_writer,
    checked against it in test_gguf_writer, does): the output must carry the interval of its layers."""
    fx = get_fixture("moe_r3_fa2")
    hf = tmp_path / "ckpt"
    shutil.copytree(fx.hf_dir, hf)
    cfg = {k: v for k, v in fx.config.items() if k != "full_attention_interval"}
    (hf / "config.json").write_text(json.dumps(cfg))
    src = hf
    if kind == "gguf":
        src = write_gguf(hf, tmp_path / "model.gguf")
        with GGUFFile(src) as g:
            assert g.get("qwen35moe.full_attention_interval") == 4
    out = convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert json.loads((out / "config.json").read_text())["full_attention_interval"] == 2
    theirs, ref = mlx_lm_logits(out, fx.prompt_ids[:N]), np.asarray(fx.ref_logits[:N])
    assert (np.abs(theirs - ref).max(-1) / (ref.max(-1) - ref.min(-1))).max() <= 1e-3


def test_mlx_lm_generate_command(cache_root):
    out = served("moe_r3_fa2", cache_root)
    done = subprocess.run([sys.executable, "-m", "mlx_lm.generate", "--model", str(out), "--prompt", "hello",
                           "--max-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Generation: " in done.stdout, done.stdout
