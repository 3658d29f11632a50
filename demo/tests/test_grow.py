"""demo/grow.py: a GGUF back into transformers' model, and widening that keeps what it computes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from fixtures import get_fixture  # noqa: E402


@pytest.fixture(scope="module")
def loaded():
    """llama.cpp's f32 conversion of the moe_r4 fixture, loaded back."""
    from demo.grow import load_gguf

    fx = get_fixture("moe_r4")
    model, shape = load_gguf(fx.gguf_path("f32"))
    return fx, model.eval(), shape


def _logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(np.asarray(ids, dtype=np.int64))[None]).logits[0].numpy()


def test_llama_cpp_gguf_loads_back_to_transformers_logits(loaded):
    """Every transform llama.cpp's converter applied is undone: transformers on the loaded weights gives
    the logits transformers gave on the original checkpoint."""
    fx, model, shape = loaded
    assert (shape.hidden_size, shape.num_hidden_layers, shape.full_attention_interval) == (64, 8, 4)
    assert (shape.linear_num_key_heads, shape.linear_num_value_heads) == (2, 8)  # V heads reordered by llama.cpp
    np.testing.assert_allclose(_logits(model, fx.prompt_ids), np.asarray(fx.ref_logits), rtol=0, atol=2e-4)


@pytest.mark.parametrize("hidden,heads,kv", [(64, 4, 2), (96, 4, 2), (64, 8, 4), (128, 8, 4)])
def test_widen_keeps_the_logits_and_trains_every_new_weight(loaded, hidden, heads, kv):
    from demo.grow import shape_of, widen

    fx, model, shape = loaded
    wide = widen(model, hidden, heads, kv).eval()
    got = shape_of(wide.config)
    assert (got.hidden_size, got.num_attention_heads, got.num_key_value_heads) == (hidden, heads, kv)
    assert got.num_hidden_layers == shape.num_hidden_layers and got.head_dim == shape.head_dim
    # the only change the zero dimensions make is the norms' epsilon against a smaller mean square
    np.testing.assert_allclose(_logits(wide, fx.prompt_ids), np.asarray(fx.ref_logits), rtol=0, atol=5e-3)

    wide.train()
    ids = torch.as_tensor(np.asarray(fx.prompt_ids, dtype=np.int64))[None]
    wide(input_ids=ids, labels=ids).loss.backward()
    old = dict(model.named_parameters())
    grads = dict(wide.named_parameters())
    grown = 0
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.o_proj.weight",
                 "model.layers.0.linear_attn.out_proj.weight", "model.layers.0.mlp.experts.down_proj",
                 "model.layers.0.mlp.shared_expert.down_proj.weight"):  # writers: the new part starts at zero
        p, o = grads[name], old[name]
        new = torch.ones_like(p, dtype=torch.bool)
        new[tuple(slice(0, n) for n in o.shape)] = False
        if new.any():
            grown += 1
            assert not p.detach()[new].any(), name
            assert p.grad[new].abs().sum() > 0, f"{name}: no gradient reaches the new part"
    assert grown == (5 if hidden > 64 else 1 if heads > 4 else 0)  # heads alone: o_proj's new columns


@pytest.mark.parametrize("args,error", [
    ((64, 8, 2), "changes the grouping"), ((32, 4, 2), "only grows"), ((64, 2, 1), "only grows")])
def test_widen_refuses_what_it_cannot_keep(loaded, args, error):
    from demo.grow import widen

    with pytest.raises(ValueError, match=error):
        widen(loaded[1], *args)


def test_build_continues_from_a_gguf_widened(tmp_path):
    """--init GGUF --init-schedules 2 --widen-at 2: the GGUF's model (after the first schedule and one
    extension) is widened and trains the second extension only, with the GGUF's tokenizer; before its first
    update it scores that extension's first batch as the unwidened model continuing from its state does."""
    from convert.gguf_reader import GGUFFile
    from demo.build import _build_info_of, build
    from demo.grow import load_gguf
    from demo.train import ModelShape, TrainConfig

    shape = ModelShape(hidden_size=32, num_hidden_layers=2, full_attention_interval=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2,
                       linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4, moe_intermediate_size=16,
                       shared_expert_intermediate_size=16)
    cfg = TrainConfig(steps=2, batch_size=2, warmup=1, bucket=4, threads=1, procs=1, log_every=1, extend=2,
                      extend_lr=1e-3, extensions=1, open_values=0.0, open_from=0)
    first = build(tmp_path / "a" / "first.gguf", tmp_path / "w1", shape, cfg, vocab_size=400, log=lambda _: None)
    plain = build(tmp_path / "b" / "plain.gguf", tmp_path / "w1", shape, replace(cfg, extensions=2), vocab_size=400,
                  log=lambda _: None)
    lines = []
    wide = build(tmp_path / "c" / "wide.gguf", tmp_path / "w2", shape,
                 replace(cfg, extensions=2, init=str(tmp_path / "a" / "first.gguf"), init_schedules=2, widen_at=2,
                         widen_hidden=48, widen_heads=4, widen_kv_heads=2), vocab_size=400, log=lines.append)
    # what it continued: the GGUF's digest, and the build_info beside it (which describes that file)
    digest = hashlib.sha256((tmp_path / "a" / "first.gguf").read_bytes()).hexdigest()
    assert wide["init_sha256"] == first["gguf_sha256"] == digest
    assert wide["init_build"] == first and plain["init_build"] is None
    # the short record beside each GGUF: that file's digest and the commands of every build it continues
    short = json.loads((tmp_path / "c" / "build.json").read_text())
    assert short["gguf_sha256"] == hashlib.sha256((tmp_path / "c" / "wide.gguf").read_bytes()).hexdigest()
    assert short["commands"] == [first["command"], wide["command"]] and "loss_history" not in short
    assert any(line.startswith("widened to hidden 48, 4 heads over 2") for line in lines)
    assert any(line.startswith("extension 2/2: 2 steps on ") for line in lines)
    assert [h["step"] for h in wide["loss_history"]] == [1, 2]
    assert wide["loss_history"][0]["loss"] == pytest.approx(plain["loss_history"][4]["loss"], abs=0.02)
    assert (wide["shape"]["hidden_size"], wide["shape"]["num_attention_heads"]) == (48, 4)
    assert load_gguf(tmp_path / "c" / "wide.gguf")[1].hidden_size == 48
    with GGUFFile(tmp_path / "a" / "first.gguf") as a, GGUFFile(tmp_path / "c" / "wide.gguf") as b:
        assert a.header.digest("tokenizer.") == b.header.digest("tokenizer.")
    # a build_info beside a GGUF it does not describe is not taken for its build
    (tmp_path / "c" / "first.gguf").write_bytes((tmp_path / "a" / "first.gguf").read_bytes()[:-1] + b"x")
    other = hashlib.sha256((tmp_path / "c" / "first.gguf").read_bytes()).hexdigest()
    assert _build_info_of(tmp_path / "c" / "first.gguf", other) is None
    assert _build_info_of(tmp_path / "a" / "first.gguf", digest) == first
    for broken in ("{not json", "[1, 2]", "\xff"):  # nor is one that cannot be read: the build goes on without it
        (tmp_path / "c" / "build_info.json").write_bytes(broken.encode("latin-1"))
        assert _build_info_of(tmp_path / "c" / "first.gguf", other) is None


@pytest.mark.parametrize("args,error", [
    (["--init", __file__], "go together"), (["--init-schedules", "2"], "go together"),
    (["--init", "/nonexistent.gguf", "--init-schedules", "4"], "no such file"),
    (["--init", __file__, "--init-schedules", "4", "--extensions", "3"], "leaves no schedule to train"),
    (["--init", __file__, "--init-schedules", "4", "--extensions", "4", "--induction", "1"], "not of one loaded"),
    (["--widen-at", "5"], "is not an extension this build trains")])
def test_build_cli_rejects_inits_and_widenings_it_cannot_do(args, error, capsys):
    from demo.build import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and error in capsys.readouterr().err
