"""Training is seeded and resumable: an interrupted run resumed from its saved state ends with the
same weights as an uninterrupted one."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from demo import corpus
from demo.tokenizer import train_bpe
from demo.train import (IGNORE, ModelShape, TrainConfig, copy_drills, encode, induction_init, lm_loss,
                              lookup_drills,
                              model_config, recall_init, token_ids, train, train_parallel)

torch = pytest.importorskip("torch")

SHAPE = ModelShape(hidden_size=32, num_hidden_layers=2, full_attention_interval=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16, linear_num_key_heads=1, linear_num_value_heads=2,
                   linear_key_head_dim=16, linear_value_head_dim=16, num_experts=4, moe_intermediate_size=16,
                   shared_expert_intermediate_size=16)
CFG = TrainConfig(steps=4, batch_size=2, warmup=1, bucket=4, threads=1, procs=1, log_every=1)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def setup():
    texts = [corpus.render_sample(s) for s in corpus.generate("train", 12)]
    tok = train_bpe(texts, 400)
    eos, pad = token_ids(tok)
    rows = [(ids[:96], labels[:96], focus[:96]) for ids, labels, focus in (encode(tok, t) for t in texts)]
    return tok, rows, model_config(SHAPE, tok.get_vocab_size(), eos, pad, 0.01), pad


def _model(config):
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(0)
    return Qwen3_5MoeForCausalLM(config).float()


def test_tokenizer_training_is_deterministic(setup):
    tok = setup[0]
    texts = [corpus.render_sample(s) for s in corpus.generate("train", 12)]
    assert train_bpe(texts, 400).to_str() == tok.to_str()


def test_resume_gives_the_same_weights(setup, tmp_path):
    torch.set_num_threads(1)
    _, rows, config, pad = setup
    straight = _model(config)
    train(straight, rows, CFG, pad, log=lambda _: None)

    def stop_at_2(line):
        if '"step": 2,' in line:
            raise Interrupt

    state = tmp_path / "state.pt"
    first = _model(config)
    with pytest.raises(Interrupt):
        train(first, rows, CFG, pad, log=stop_at_2, state_path=state, save_every=1)
    resumed = _model(config)
    result = train(resumed, rows, CFG, pad, log=lambda _: None, state_path=state, save_every=1)
    assert result["steps"] == CFG.steps
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("seed", range(6))
def test_recall_init_reads_back_what_followed_the_token(monkeypatch, seed):
    """After recall_init, transformers' own GatedDeltaNet (first linear layer) answers a repeated token
    with the value of the token that followed its earlier occurrence: the induction step."""
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as qwen

    config = model_config(replace(SHAPE, linear_key_head_dim=32, linear_value_head_dim=32), 256, 0, 1)
    torch.manual_seed(seed)
    model = qwen.Qwen3_5MoeForCausalLM(config).float().eval()
    assert recall_init(model, 1, -6.0) == [0]
    seen = []
    rule = qwen.torch_chunk_gated_delta_rule

    def capture(query, key, value, **kw):
        out = rule(query, key, value, **kw)
        seen.append((value[0], out[0][0]))  # [T, heads, dim] each
        return out

    monkeypatch.setattr(qwen, "torch_chunk_gated_delta_rule", capture)
    ids = torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(seed))[:10]
    ids = torch.cat([ids, ids[3:4]])  # ..., a3, a4, ..., a9, a3 -> should read back a4
    with torch.no_grad():
        model(input_ids=ids[None], use_cache=False)
    value, out = seen[0]
    for head in range(value.shape[1]):
        v = torch.nn.functional.normalize(value[:-1, head] - value[:-1, head].mean(0), dim=-1)
        sim = v @ torch.nn.functional.normalize(out[-1, head], dim=-1)
        assert int(sim.argmax()) == 4, sim


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("built", [None, (0, False), (1, False), (0, True)])  # plain init; (kv_heads, plain_after)
def test_induction_init_copies_a_repeated_run(seed, built):
    """With induction_init, transformers' own model (the demo shape, untrained) continues the second copy
    of a run of tokens as the first one went, after a long unrelated prefix; a plain init does not. With
    plain_after the blocks after the circuit keep their plain init and it still copies."""
    from transformers import Qwen3_5MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen3_5MoeForCausalLM(model_config(ModelShape(), 1024, 0, 1)).float().eval()
    if built is not None:
        kv_heads, plain_after = built
        free = model.model.layers[2].self_attn.k_proj.weight[32:].clone()  # the second key/value head
        later = [p.clone() for p in model.model.layers[3:].parameters()]
        assert induction_init(model, kv_heads=kv_heads, plain_after=plain_after) == [0, 2]
        assert torch.equal(model.model.layers[2].self_attn.k_proj.weight[32:], free) == (kv_heads == 1)
        kept = all(torch.equal(a, b) for a, b in zip(later, model.model.layers[3:].parameters()))
        assert kept == plain_after
    perm = torch.randperm(1024, generator=torch.Generator().manual_seed(seed))
    prefix, run = perm[:200], perm[200:230]
    ids = torch.cat([prefix, run, perm[230:231], run])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0]
    start = len(prefix) + len(run) + 1  # the second run's first token
    hits = (logits[start:-1].argmax(-1) == ids[0, start + 1:]).float().mean().item()
    assert hits >= 0.75 if built is not None else hits <= 0.1, hits


def test_copy_drills_repeat_a_run_of_corpus_tokens():
    counts = np.zeros(50, dtype=np.int64)
    counts[10:20] = np.arange(1, 11)
    counts[7] = 1000  # the separator: the most common token
    for seed in range(5):
        ids, labels = copy_drills(counts, 4, np.random.default_rng(seed))
        assert ids.shape == labels.shape and ids.shape[0] == 4
        copied = int((labels[0] != IGNORE).sum())
        sep = ids.shape[1] - copied - 1
        assert (ids[:, sep] == 7).all()
        assert 12 <= copied <= 36 and 0 <= sep - copied <= 16
        assert (ids[:, sep + 1:] == ids[:, sep - copied:sep]).all()
        assert (labels[:, sep + 1:] == ids[:, sep + 1:]).all() and (labels[:, :sep + 1] == IGNORE).all()
        assert set(np.unique(ids)) <= set(range(10, 20)) | {7}  # never a token the corpus does not use


def test_lookup_drills_answer_whether_the_asked_name_is_on_the_list():
    """Read back independently: every answer is `listed` exactly when the name before it (after the quote) is
    written on the list as quote, name, listed; both answers come up, and never a special token in the names."""
    counts = np.zeros(60, dtype=np.int64)
    counts[50:] = -1  # special: the quote and answer tokens below are among them, so they mark the layout
    quote, listed, unlisted = 55, 56, 57
    answered = Counter()
    for seed in range(30):
        ids, labels = lookup_drills(counts, 6, np.random.default_rng(seed), quote, listed, unlisted)
        answers = np.flatnonzero(labels[0] != IGNORE)
        assert len(answers) == 4 and (labels != IGNORE).sum() == 4 * 6
        width = int(answers[1] - answers[0] - 2)
        assert width in (2, 3)
        for row in range(6):
            head = ids[row, :answers[0] - width - 1].tolist()
            entries = {tuple(head[i + 1:i + 1 + width]) for i in range(len(head) - width - 1)
                       if head[i] == quote and head[i + 1 + width] == listed}
            assert 2 <= len(entries) <= 6
            for j in answers:
                assert ids[row, j - width - 1] == quote
                on_list = tuple(ids[row, j - width:j].tolist()) in entries
                assert labels[row, j] == ids[row, j] == (listed if on_list else unlisted)
                answered[on_list] += 1
        assert set(np.unique(ids)) <= set(range(50)) | {quote, listed, unlisted}
    assert min(answered.values()) > 0.3 * sum(answered.values()), answered


def test_uniform_copy_drills_draw_rare_and_unused_tokens_alike_but_never_special_ones():
    """copy_uniform: the tokens a held-out value is made of may be ones the corpus hardly uses (or never: BPE
    merges that later merges swallow); the drills draw them as often as any, and never a negative-count one."""
    counts = np.zeros(40, dtype=np.int64)
    counts[5:10] = 1000
    counts[35:] = -1  # the added (special) tokens
    runs = []  # the copied runs' tokens (not the separator, the most common token)
    for seed in range(40):
        ids, labels = copy_drills(counts, 8, np.random.default_rng(seed), uniform=True)
        assert set(np.unique(ids)) <= set(range(35))
        runs.append(ids[labels != IGNORE])
    seen = np.bincount(np.concatenate(runs), minlength=40)
    assert (seen[35:] == 0).all() and (seen[:35] > 0).all()
    assert seen[:35].max() / seen[:35].min() < 2.0, seen


def test_tied_recall_layer_keeps_key_equal_to_query(setup):
    torch.set_num_threads(1)
    _, rows, config, pad = setup
    model = _model(config)
    recall_init(model, 1, -6.0)
    train(model, rows, replace(CFG, recall_layers=1, recall_tied=1, copy_rows=2), pad, log=lambda _: None)
    w = model.model.layers[0].linear_attn.in_proj_qkv.weight
    kd = model.model.layers[0].linear_attn.key_dim
    assert torch.equal(w[:kd], w[kd:2 * kd])
    assert w[:kd].any()


def test_induction_lr_scales_only_the_built_layers(setup):
    """induction_lr 0: the two layers induction_init builds keep their weights through training; the rest learns."""
    torch.set_num_threads(1)
    _, rows, config, pad = setup
    model = _model(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, rows, replace(CFG, induction=1, induction_lr=0.0), pad, log=lambda _: None)
    for n, p in model.named_parameters():
        built = n.startswith(("model.layers.0.linear_attn.", "model.layers.1.self_attn."))
        assert torch.equal(p, before[n]) == built, n


def test_lm_loss_weights_focus_prompt_and_padding():
    """The weighted mean of per-token cross-entropies, worked out with numpy: weight 1 on assistant
    tokens, focus_weight on the flagged ones, prompt_weight on the rest, 0 on padding."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 6, 5)).astype(np.float32)
    ids = np.array([[1, 2, 3, 4, 0, 0]])  # pad id 0
    labels = np.array([[IGNORE, IGNORE, 3, 4, IGNORE, IGNORE]])
    focus = np.array([[0, 0, 0, 1, 0, 0]], dtype=np.float32)
    logp = logits[0, :-1] - np.log(np.exp(logits[0, :-1]).sum(-1, keepdims=True))
    ce = -logp[np.arange(5), ids[0, 1:]]
    weights = np.array([0.25, 1.0, 3.0, 0.0, 0.0])  # predicts 2 (prompt), 3, 4 (focus), pad, pad
    expected = (ce * weights).sum() / weights.sum()
    got = lm_loss(torch.from_numpy(logits), torch.from_numpy(ids), torch.from_numpy(labels), 0, 0.25,
                  torch.from_numpy(focus), 3.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    plain = lm_loss(torch.from_numpy(logits), torch.from_numpy(ids), torch.from_numpy(labels), 0, 0.25)
    weights[2] = 1.0
    assert plain.item() == pytest.approx((ce * weights).sum() / weights.sum(), rel=1e-5)


def test_two_processes_give_the_weights_of_one(setup, tmp_path):
    """procs=2: two processes, a batch each per step, gradients summed over gloo, end with the weights one
    process gets running both batches of every step itself; and those differ from a one-batch-per-step run."""
    _, rows, config, pad = setup
    cfg = replace(CFG, procs=2, steps=3)
    alone = _model(config)
    result = train(alone, rows, cfg, pad, log=lambda _: None)
    spawned = _model(config)
    parallel = train_parallel(spawned, rows, cfg, pad, tmp_path / "state.pt", log=lambda _: None)
    assert parallel["steps"] == 3 and parallel["tokens"] == result["tokens"]
    assert [h["loss"] for h in parallel["history"]] == pytest.approx([h["loss"] for h in result["history"]], abs=2e-4)
    for (name, a), b in zip(alone.named_parameters(), spawned.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    single = _model(config)
    train(single, rows, replace(cfg, procs=1), pad, log=lambda _: None)
    assert not all(torch.allclose(a, b) for a, b in zip(alone.parameters(), single.parameters()))


def test_build_extension_trains_on_from_the_first_schedule(tmp_path):
    """extend: the first schedule as before (resumed here from its saved state, so not retrained), then more
    steps on conversations it never saw, with its tokenizer; the GGUF holds the extended weights."""
    from gguf import GGUFReader

    from demo.build import build, samples_for

    cfg = replace(CFG, steps=2, extend=2, extend_lr=1e-3, extensions=1)
    work, lines = tmp_path / "work", []
    first = build(tmp_path / "first.gguf", work, SHAPE, replace(cfg, extend=0), vocab_size=400, log=lines.append)
    tokenizer = (work / "tokenizer" / "tokenizer.json").read_text()
    lines.clear()
    extended = build(tmp_path / "extended.gguf", work, SHAPE, cfg, vocab_size=400, log=lines.append)
    assert any(line.startswith("resuming at step 2 ") for line in lines)
    assert (work / "tokenizer" / "tokenizer.json").read_text() == tokenizer
    assert extended["corpus"]["conversations"] == 2 * samples_for(2, cfg) == 2 * first["corpus"]["conversations"]
    assert [h["step"] for h in extended["loss_history"]] == [1, 2, 3, 4]
    assert extended["loss_history"][:2] == first["loss_history"]
    assert extended["tokens_trained"] == extended["loss_history"][-1]["tokens"] > first["tokens_trained"]

    def tensor(path, name):
        return next(np.array(t.data) for t in GGUFReader(path).tensors if t.name == name)

    assert tensor(tmp_path / "first.gguf", "token_embd.weight").shape == \
        tensor(tmp_path / "extended.gguf", "token_embd.weight").shape
    assert not np.array_equal(tensor(tmp_path / "first.gguf", "token_embd.weight"),
                              tensor(tmp_path / "extended.gguf", "token_embd.weight"))


def test_build_adds_a_further_extension_after_the_finished_ones(tmp_path):
    """extensions=2 on a work directory with a finished first schedule and extension: both resume, and only
    the second extension trains, on conversations neither saw before (the stream continued once more)."""
    from demo.build import build, samples_for

    cfg = replace(CFG, steps=2, extend=2, extend_lr=1e-3, extensions=1)
    work, lines = tmp_path / "work", []
    once = build(tmp_path / "once.gguf", work, SHAPE, cfg, vocab_size=400, log=lines.append)
    lines.clear()
    twice = build(tmp_path / "twice.gguf", work, SHAPE, replace(cfg, extensions=2), vocab_size=400, log=lines.append)
    assert [line.split(" from ")[0] for line in lines if line.startswith("resuming")] == \
        ["resuming at step 2", "resuming at step 2"]
    assert any(line.startswith("extension 2/2: 2 steps on ") for line in lines)
    assert (work / "train_state_extend2.pt").is_file()
    assert twice["corpus"]["conversations"] == 3 * samples_for(2, cfg)
    assert [h["step"] for h in twice["loss_history"]] == [1, 2, 3, 4, 5, 6]
    assert twice["loss_history"][:4] == once["loss_history"]
    assert twice["tokens_trained"] > once["tokens_trained"]


def test_build_trains_an_extension_beside_missing_tool_twins(tmp_path):
    from demo.build import build, samples_for

    cfg = replace(CFG, steps=2, extend=2, extend_lr=1e-3, extensions=1, reasoning="lookup", missing_twins=1.0)
    lines = []
    info = build(tmp_path / "twins.gguf", tmp_path / "work", SHAPE, cfg, vocab_size=400, log=lines.append)
    twins = [int(line.split()[2]) for line in lines if line.startswith("extension 1:") and "missing-tool twins" in line]
    assert twins and 0 < twins[0] < samples_for(2, cfg)
    assert info["train"]["missing_twins"] == 1.0 and info["loss_history"][-1]["step"] == 4


def test_build_open_values_from_a_later_schedule(tmp_path):
    """open_from=2: the first schedule and extension resume from states saved before open values existed (their
    conversations had none), and only the second extension trains on conversations with open values."""
    import torch

    from demo.build import build, samples_for

    cfg = replace(CFG, steps=2, extend=2, extend_lr=1e-3, extensions=1)
    work, lines = tmp_path / "work", []
    build(tmp_path / "once.gguf", work, SHAPE, cfg, vocab_size=400, log=lines.append)
    for name in ("train_state.pt", "train_state_extend.pt"):  # as saved before the fields existed
        state = torch.load(work / name, weights_only=False)
        for field in ("open_values", "open_from", "wild_values", "wild_from"):
            assert not state["config"].pop(field)
        torch.save(state, work / name)
    lines.clear()
    info = build(tmp_path / "open.gguf", work, SHAPE, replace(cfg, extensions=2, open_values=1.0, open_from=2,
                                                                wild_values=0.5, wild_from=2),
                 vocab_size=400, log=lines.append)
    assert len([line for line in lines if line.startswith("resuming at step 2")]) == 2
    assert any(line.startswith("extension 2/2: 2 steps on ") and "with open values 1.0 (wild 0.5)" in line
               for line in lines)
    assert not any(line.startswith("extension 1/2") for line in lines if "open values" in line)
    assert info["corpus"]["conversations"] == 3 * samples_for(2, cfg)
    config = torch.load(work / "train_state_extend2.pt", weights_only=False)["config"]
    assert (config["open_values"], config["wild_values"]) == (1.0, 0.5)


@pytest.mark.parametrize("args, message", [
    (["--open-values", "1.5"], "--open-values is a share from 0 to 1"),
    (["--open-from", "-1"], "--open-values is a share from 0 to 1"),
    (["--wild-values", "0.5", "--open-values", "0"], "--wild-values is a share from 0 to 1 of the open values"),
    (["--wild-values", "0.5", "--wild-from", "2"], "a --wild-from of --open-from or later"),
    (["--wild-values", "2", "--wild-from", "4"], "--wild-values is a share from 0 to 1"),
    (["--copy-uniform", "1"], "1 needs --copy-rows 1 or more"),
    (["--copy-uniform", "2", "--copy-rows", "4"], "--copy-uniform is 0 or 1"),
    (["--copy-rows", "-1"], "--copy-uniform is 0 or 1"),
    (["--lookup-rows", "-2"], "--lookup-rows must be 0 or more"),
    (["--focus-ends", "2"], "--focus-ends is 0 or 1"),
    (["--missing-twins", "0.5"], "needs --reasoning lookup"),
    (["--missing-twins", "1.5", "--reasoning", "lookup"], "--missing-twins is a share from 0 to 1")])
def test_build_cli_rejects_options_it_cannot_use(args, message, capsys):
    from demo.build import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_build_does_not_extend_a_stopped_first_schedule(tmp_path):
    from demo.build import build

    cfg = replace(CFG, steps=2, stop_after=1, extend=2)
    info = build(tmp_path / "m.gguf", tmp_path / "work", SHAPE, cfg, vocab_size=400, log=lambda _: None)
    assert [h["step"] for h in info["loss_history"]] == [1]
    assert not (tmp_path / "work" / "train_state_extend.pt").exists()


@pytest.mark.parametrize("args", [["--extend", "-1"], ["--extensions", "-1"], ["--last-extend", "-1"], ["--steps", "0"], ["--extend-lr", "0"]])
def test_build_cli_rejects_counts_that_cannot_train(args, capsys):
    from demo.build import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "--extend, --extensions and --last-extend 0 or more" in capsys.readouterr().err


def test_build_last_extension_of_another_length(tmp_path, monkeypatch):
    """last_extend: the last extension schedule is that many steps on its own share of new conversations,
    after the earlier extensions' (the first of the conversations it would have had with extend steps)."""
    import demo.train as train_module
    from demo.build import build, samples_for

    trained = []  # each schedule's conversations

    def recording(model, rows, *args, **kwargs):
        trained.append(rows)
        return train_parallel(model, rows, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_parallel", recording)
    cfg = replace(CFG, steps=2, extend=2, extend_lr=1e-3, extensions=2, last_extend=1, open_values=0.0, open_from=0)
    lines = []
    info = build(tmp_path / "m.gguf", tmp_path / "work", SHAPE, cfg, vocab_size=400, log=lines.append)
    assert [h["step"] for h in info["loss_history"]] == [1, 2, 3, 4, 5]
    assert f"extension 2/2: 1 steps on {samples_for(1, cfg)} more conversations, peak lr 0.001" in lines
    assert info["corpus"]["conversations"] == 2 * samples_for(2, cfg) + samples_for(1, cfg)
    short, trained[:] = list(trained), []
    build(tmp_path / "full.gguf", tmp_path / "work2", SHAPE, replace(cfg, last_extend=0), vocab_size=400,
          log=lambda _: None)
    assert short[:2] == trained[:2] and len(short[2]) == samples_for(1, cfg) < len(trained[2])
    assert short[2] == trained[2][:len(short[2])]
