"""Memory the engine holds is memory it reports: a snapshot keeps exactly its own row's state, a
cache keeps no forward's inputs alive, and after a soak of short requests (some cut off) MLX's
active memory is what /metrics accounts for (weights + prefix cache + live sequences)."""

import gc
import re
import time

import mlx.core as mx
import numpy as np
import pytest
from fixtures import get_fixture
from server_harness import wait_until

from model import load
from server.engine import Engine, EngineConfig, EngineCore, SamplingParams
from server.metrics import Metrics

# the fixture with the most full-attention layers: KV is most of a snapshot's bytes
FIXTURE = "moe_r3_fa2"
# the allocator rounds each buffer up (to a page: 16 KiB on Apple silicon)
ROUNDING = 16 << 10


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = load(get_fixture(FIXTURE).hf_dir, dtype="float32")
    mx.eval(model.parameters())
    return model, tokenizer


@pytest.fixture(scope="module")
def model(lm):
    return lm[0]


def state_bytes(config, tokens: int, itemsize: int = 4) -> int:
    """One sequence's state from first principles: K and V for each full-attention layer, the
    conv tail and the recurrent state for each linear one."""
    c = config
    n_full = sum(t == "full_attention" for t in c.layer_types)
    n_lin = len(c.layer_types) - n_full
    kv = n_full * 2 * tokens * c.num_key_value_heads * c.head_dim * itemsize
    conv_channels = (2 * c.linear_num_key_heads * c.linear_key_head_dim
                     + c.linear_num_value_heads * c.linear_value_head_dim)
    conv = (c.linear_conv_kernel_dim - 1) * conv_channels * itemsize
    recurrent = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4  # float32 always
    return kv + n_lin * (conv + recurrent)


def held_by(make) -> tuple[object, int]:
    """What `make()` returns, and the active bytes that stay allocated once everything else it
    built is gone."""
    gc.collect()
    base = mx.get_active_memory()
    out = make()
    gc.collect()
    return out, mx.get_active_memory() - base


def test_snapshot_of_one_row_holds_only_that_rows_bytes(model):
    lengths = [7, 300, 40, 120]  # the batch's KV capacity is the longest row's, rounded up

    def snapshot_row_2():
        rng = np.random.default_rng(0)
        tokens = rng.integers(100, 5000, size=(len(lengths), max(lengths)))
        cache = model.make_cache(len(lengths))
        mx.eval(model(mx.array(tokens), cache, lengths=lengths, last_only=True))
        return cache.snapshot(2)

    snap, held = held_by(snapshot_row_2)
    expected = state_bytes(model.config, 40)
    assert snap.offsets == [40]
    assert snap.nbytes == expected
    # nothing else of the batch stays alive through the snapshot (before: every row's capacity)
    n_arrays = len(snap.state())
    assert expected <= held <= expected + n_arrays * ROUNDING, (held, expected)


def test_a_cache_after_a_long_prefill_keeps_no_inputs_alive(model):
    """The conv state is the last K-1 inputs of the forward's window; as a slice of it, it kept
    the whole [B, K-1+T, channels] window alive."""
    T = 600

    def prefill():
        cache = model.make_cache(1)
        mx.eval(model(mx.arange(100, 100 + T)[None], cache, last_only=True))
        mx.eval(cache.state())
        return cache

    cache, held = held_by(prefill)
    assert cache.offsets == [T]
    assert cache.nbytes >= state_bytes(model.config, T)  # KV is allocated in steps: spare capacity counts
    assert cache.nbytes <= held <= cache.nbytes + len(cache.state()) * ROUNDING, (held, cache.nbytes)


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def gauges(metrics: Metrics) -> dict[str, float]:
    text = metrics.render().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^deltaserve_(\w+) ([0-9.e+]+)$", text, re.M)}


def test_soak_active_memory_settles_at_what_metrics_account_for(lm):
    m, tok = lm
    # a small prefix cache, so that eviction runs throughout
    engine = Engine(m, tok, EngineConfig(prefix_cache_bytes=6 << 20, block_size=16, memory_budget_bytes=1 << 30,
                                         max_num_seqs=16, prefill_tokens_per_step=256))
    metrics = Metrics(engine)
    # other tests in this process may hold arrays of their own: count from here
    gc.collect()
    before = mx.get_active_memory()
    rng = np.random.default_rng(1)
    shared = rng.integers(100, 5000, size=24).tolist()  # a common system prompt for some
    start = time.monotonic()
    try:
        finished = cut = 0
        for wave in range(16):
            streams = []
            for i in range(16):
                own = rng.integers(100, 5000, size=int(rng.integers(3, 60))).tolist()
                prompt = shared + own if i % 3 == 0 else own
                params = SamplingParams(max_tokens=int(rng.integers(1, 10)), temperature=0.7, seed=wave * 16 + i,
                                        ignore_eos=True)
                streams.append(engine.submit(prompt, params))
            for i, stream in enumerate(streams):
                if i % 4 == 1:  # the client goes away after its first delta
                    next(iter(stream))
                    stream.close()
                    cut += 1
                elif i % 8 == 2:  # or stops the request itself
                    engine.stop(stream.request_id)
                    list(stream)
                else:
                    deltas = list(stream)
                    assert deltas[-1].finish_reason in ("length", "stop"), deltas[-1]
                    finished += 1
        assert finished + cut > 200
        assert wait_until(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0
                   and mx.get_cache_memory() == 0, timeout=10)
        g = gauges(metrics)
    finally:
        engine.shutdown()
    assert g["prefix_cache_entries"] > 10 and g["sequence_state_bytes"] == 0
    assert g["prefix_cache_bytes"] <= 6 << 20
    assert g["model_bytes"] == sum(p.size * p.itemsize for p in map(np.asarray, _leaves(m.parameters())))
    # what the soak left allocated is what the metrics say it holds (the weights were there before)
    grown = g["mlx_active_memory_bytes"] - before
    assert grown <= 1.2 * (g["prefix_cache_bytes"] + g["sequence_state_bytes"]), (grown, g)
    assert g["mlx_cache_memory_bytes"] == 0  # emptied when the engine went idle
    assert time.monotonic() - start < 60


def test_prefix_cache_entries_count_all_they_hold_logits_included(lm):
    model, tok = lm
    core = EngineCore(model, tok, EngineConfig(prefix_cache_bytes=64 << 20, block_size=16, memory_budget_bytes=1 << 30,
                                               prefill_tokens_per_step=16))
    prompt = list(range(200, 250))
    core.add(prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    while core.has_work():
        core.step()
    pc = core.prefix_cache
    nodes = list(pc._lru.values())
    # block cuts 32, 48 (16 thinned: two blocks back, and this model's state weighs ~1.2k tokens
    # of KV); the prompt's end (with its next-token logits); all that was fed
    depths = sorted(n.depth for n in nodes)
    assert depths[:3] == [32, 48, 50] and len(depths) == 4 and depths[3] > 50
    logits_bytes = model.config.vocab_size * 4
    one_state = state_bytes(model.config, 0)
    for node in nodes:
        has_logits = node.logits is not None
        assert has_logits == (node.depth == 50)
        held = node.state.nbytes + (node.logits.nbytes if has_logits else 0)
        assert held == one_state + (logits_bytes if has_logits else 0)
    # each token's KV once: one path of depths[3] tokens
    kv = state_bytes(model.config, depths[3]) - one_state
    assert pc.kv_tokens == depths[3] and pc.kv_bytes == kv
    assert pc.nbytes == kv + sum(n.state.nbytes + (n.logits.nbytes if n.logits is not None else 0) for n in nodes)
