"""convert/gguf_writer.py against llama.cpp's own convert_hf_to_gguf.py: for every fixture checkpoint
with a llama.cpp GGUF, the same keys and values, the same tensors (names, order, shapes, types,
bytes); with general.name and tokenizer.ggml.pre set as llama.cpp derived them, the same file."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from convert.gguf_writer import GGUFWriteError, write_gguf
from fixtures import GGUF_FIXTURES, get_fixture
from fixtures.mtp import get_mtp_fixture

# The two keys our writer sets from its arguments instead of deriving them like llama.cpp:
# general.name (llama.cpp: from the directory name or a model card) and tokenizer.ggml.pre
# (llama.cpp: by hashing a test tokenisation against its table of known vocabularies; these
# fixtures use Qwen2's vocabulary, hence "qwen2"; our own demo vocabulary is in no table).
PROVENANCE_KEYS = {"general.name", "tokenizer.ggml.pre"}


def _fields(reader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = f.contents()
        out[name] = ([int(t) for t in f.types], value)
    return out


def _compare(ours_path, ref_path) -> None:
    ours, ref = gguf.GGUFReader(ours_path), gguf.GGUFReader(ref_path)
    a, b = _fields(ours), _fields(ref)
    assert list(a) == list(b), "same keys in the same order"
    for key in a:
        if key in PROVENANCE_KEYS:
            assert a[key][0] == b[key][0], key
            continue
        assert a[key] == b[key], key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for x, y in zip(ours.tensors, ref.tensors):
        assert x.tensor_type == y.tensor_type, x.name
        assert list(x.shape) == list(y.shape), x.name
        assert np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes(), x.name


def test_matches_llama_cpp_key_by_key_and_tensor_by_tensor(tmp_path):
    """With our own name and pre-tokenizer (what the demo build writes); the byte-identical test below
    covers every fixture, this one says which key or tensor differs if that ever fails."""
    fx = get_fixture("moe_r4")
    ours = write_gguf(fx.hf_dir, tmp_path / "ours.gguf")
    _compare(ours, fx.gguf_path("bf16"))
    fields = gguf.GGUFReader(ours).fields
    assert fields["general.name"].contents() == fx.hf_dir.name
    assert fields["tokenizer.ggml.pre"].contents() == "qwen35"


@pytest.mark.parametrize("name,outtype", [(n, "bf16") for n in GGUF_FIXTURES] + [("moe_r4", "f32")])
def test_same_file_as_llama_cpp_given_its_name_and_pre(name, outtype, tmp_path):
    fx = get_fixture(name)
    ref = fx.gguf_path(outtype)
    fields = gguf.GGUFReader(ref).fields
    ours = write_gguf(fx.hf_dir, tmp_path / "ours.gguf", outtype=outtype,
                      name=fields["general.name"].contents(), tokenizer_pre=fields["tokenizer.ggml.pre"].contents())
    assert ours.read_bytes() == ref.read_bytes()


def test_per_expert_checkpoint_gives_the_same_tensors(tmp_path):
    """Checkpoints that store one tensor per expert (older transformers) are stacked like fused ones."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    fx = get_fixture("moe_r4")
    split = tmp_path / fx.hf_dir.name
    shutil.copytree(fx.hf_dir, split)
    state = load_file(split / "model.safetensors")
    for key in [k for k in state if k.endswith("mlp.experts.gate_up_proj")]:
        prefix = key[: -len("gate_up_proj")]
        gate_up, down = state.pop(key), state.pop(prefix + "down_proj")
        n_ff = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            state[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :n_ff].clone()
            state[f"{prefix}{e}.up_proj.weight"] = gate_up[e, n_ff:].clone()
            state[f"{prefix}{e}.down_proj.weight"] = down[e].clone()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, split / "model.safetensors")
    ours = gguf.GGUFReader(write_gguf(split, tmp_path / "split.gguf"))
    ref = {t.name: t for t in gguf.GGUFReader(fx.gguf_path("bf16")).tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(ref)
    for t in ours.tensors:
        assert np.asarray(t.data).tobytes() == np.asarray(ref[t.name].data).tobytes(), t.name


def test_refuses_other_architectures(tmp_path):
    fx = get_fixture("moe_r4")
    (tmp_path / "config.json").write_text(json.dumps({**fx.config, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(GGUFWriteError, match="architectures"):
        write_gguf(tmp_path, tmp_path / "x.gguf")


def test_ssm_a_without_torch_is_within_one_ulp_of_llama_cpp_arithmetic(monkeypatch):
    """ssm_a = -exp(A_log): with torch, torch's float32 exp as llama.cpp computes it; without torch
    (a Mac with only MLX), correctly rounded, which may differ from it in the last bit and no more."""
    import sys

    import torch

    from convert.gguf_writer import _neg_exp

    x = np.random.default_rng(0).uniform(-8, 3, 4096).astype(np.float32)
    with_torch = _neg_exp(x)
    assert np.array_equal(with_torch, (-torch.exp(torch.from_numpy(x))).numpy())
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    without = _neg_exp(x)
    ulps = np.abs(with_torch.view(np.int32).astype(np.int64) - without.view(np.int32).astype(np.int64))
    assert ulps.max() <= 1
    assert np.array_equal(without, -np.exp(x.astype(np.float64)).astype(np.float32))


# dense and MoE: the writer's MTP code branches on nothing else but n_layers (the block index); each
# further shape costs ~20 s here and its trunk is compared above
@pytest.mark.parametrize("name", ["mtp_dense", "mtp_moe"])
def test_mtp_layers_as_llama_cpp_writes_them(name, tmp_path):
    """With mtp=True: the same file as llama.cpp's converter run without --no-mtp (nextn.* in block n_layers)."""
    fx = get_mtp_fixture(name)
    ref = fx.gguf_path()
    fields = gguf.GGUFReader(ref).fields
    ours = write_gguf(fx.hf_dir, tmp_path / "ours.gguf", name=fields["general.name"].contents(),
                      tokenizer_pre=fields["tokenizer.ggml.pre"].contents(), mtp=True)
    if ours.read_bytes() != ref.read_bytes():
        _compare(ours, ref)  # says which key or tensor differs
        raise AssertionError("same keys and tensors, different bytes")
