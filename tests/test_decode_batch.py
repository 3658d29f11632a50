"""The decode batch keeps KV in length buckets: rows of very different lengths each give their solo
output, hold KV in proportion to their own lengths (not the longest row's), joining or leaving
copies only the bucket involved, and the scheduler's budget covers what the runner allocates."""

import gc

import mlx.core as mx
import numpy as np
import pytest
from fixtures import get_fixture
from server_harness import solo_greedy

from model import load
from model.cache import KV_STEP, KVLayer, kv_capacity
from server.engine import EngineConfig, EngineCore, SamplingParams
from server.engine.runner import Runner

FIXTURE = "moe_r3_fa2"  # two full-attention layers of four


@pytest.fixture(scope="module")
def model():
    m, _ = load(get_fixture(FIXTURE).hf_dir, dtype="float32")
    mx.eval(m.parameters())
    return m


def kv_bytes(config, tokens: int, itemsize: int = 4) -> int:
    """K and V of `tokens` positions over the full-attention layers, from the config."""
    n_full = sum(t == "full_attention" for t in config.layer_types)
    return n_full * 2 * tokens * config.num_key_value_heads * config.head_dim * itemsize


def bucket_bytes(runner: Runner) -> int:
    return sum(a.nbytes for b in runner.batch.buckets for kv in b.kv for a in kv.arrays())


def prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(100, 50000, size=n).tolist()


def random_cache(model, length: int, seed: int):
    """A batch-1 cache as a prefill of `length` tokens leaves it, with random KV (layout, not values,
    is what the memory tests measure)."""
    cache = model.make_cache(1)
    for i, layer in enumerate(cache.layers):
        if isinstance(layer, KVLayer):
            shape = (1, layer.keys.shape[1], length, layer.keys.shape[3])
            k1, k2 = mx.random.split(mx.random.key(100 * seed + i))
            cache.layers[i] = KVLayer(mx.random.normal(shape, key=k1), mx.random.normal(shape, key=k2))
    cache.offsets = [length]
    mx.eval(cache.state())
    return cache


def test_kv_capacity_is_within_half_again_a_length_or_one_step():
    caps = set()
    for t in range(1, 140_000, 7):
        cap = kv_capacity(t)
        caps.add(cap)
        assert cap >= t and cap % KV_STEP == 0
        assert cap <= max(1.5 * t, t + KV_STEP), (t, cap)
    assert len(caps) < 40  # a row outgrowing its bucket moves O(log length) times, not every KV_STEP


def test_rows_of_mixed_lengths_each_give_their_solo_output(model):
    # 250 crosses a bucket boundary while decoding; rows join late and one leaves early
    lengths = {"long": 600, "a": 20, "edge": 250, "b": 35, "c": 5}
    prompts = {rid: prompt(n, seed) for seed, (rid, n) in enumerate(lengths.items())}
    steps = 12
    want = {rid: solo_greedy(model, p, steps) for rid, p in prompts.items()}

    runner = Runner(model)
    got: dict[str, list[int]] = {}
    logits_seen: dict[str, list[np.ndarray]] = {}

    def admit(rids):
        for rid in rids:
            runner.start(rid, None)
        for rid, logits in zip(rids, runner.prefill([(rid, prompts[rid]) for rid in rids])):
            logits_seen[rid] = [np.array(logits)]
            got[rid] = [int(mx.argmax(logits).item())]
            runner.join(rid)

    def decode():
        logits = runner.decode(mx.array([got[rid][-1] for rid in runner.rows]))
        for i, rid in enumerate(runner.rows):
            logits_seen[rid].append(np.array(logits[i]))
            got[rid].append(int(mx.argmax(logits[i]).item()))

    admit(["long", "a"])
    for _ in range(3):
        decode()
    admit(["edge", "b", "c"])
    while len(got["c"]) < steps:
        decode()
        if len(got["a"]) == steps:
            runner.release({"a"})
    for _ in range(steps - len(got["edge"])):
        decode()
    assert len(runner.batch.buckets) > 1
    assert runner.batch.offsets[runner.rows.index("edge")] > 256  # it moved to a larger bucket on the way
    for rid in lengths:
        n = min(steps, len(got[rid]))
        assert got[rid][:n] == want[rid][0][:n], rid
        np.testing.assert_allclose(np.stack(logits_seen[rid][:n]), np.stack(want[rid][1][:n]), atol=2e-4, rtol=1e-4)


def test_one_long_row_beside_fifteen_short_ones_holds_kv_for_their_lengths(model):
    """The issue's 32k row beside fifteen 500-token rows, scaled down 4x: at most 1.5x the KV their
    lengths need (padded to the longest row, as before, it was ~8x), in the arrays and in MLX's
    active memory."""
    lengths = [8000] + [500] * 15

    def build():
        runner = Runner(model)
        for i, n in enumerate(lengths):
            runner.prefilling[str(i)] = random_cache(model, n, i)
            runner.join(str(i))
        mx.eval(runner.decode(mx.zeros((len(lengths),), dtype=mx.int32)))
        mx.eval(runner.batch.state())
        return runner

    gc.collect()
    base = mx.get_active_memory()
    runner = build()
    gc.collect()
    held = mx.get_active_memory() - base
    need = kv_bytes(model.config, sum(lengths) + len(lengths))
    assert bucket_bytes(runner) <= 1.5 * need, (bucket_bytes(runner), need)
    # nothing but the batch's own arrays stays alive (old buckets, a padded copy)
    assert held <= runner.batch.nbytes + len(runner.batch.state()) * (16 << 10), (held, runner.batch.nbytes)


def test_joining_or_leaving_does_not_copy_the_long_rows_kv(model):
    runner = Runner(model)
    for i, n in enumerate([6000, 40, 60]):
        runner.prefilling[str(i)] = random_cache(model, n, i)
        runner.join(str(i))
    mx.eval(runner.batch.state())
    long_kv = kv_bytes(model.config, 6000)
    short = random_cache(model, 50, 9)
    runner.prefilling["3"] = short
    gc.collect()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    runner.join("3")
    mx.eval(runner.batch.state())
    assert mx.get_peak_memory() - base < long_kv / 4
    gc.collect()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    runner.release({"1"})
    mx.eval(runner.batch.state())
    assert mx.get_peak_memory() - base < long_kv / 4
    assert runner.rows == ["0", "2", "3"] and runner.batch.offsets == [6000, 60, 50]
    assert runner.snapshot("3").layers[1].keys.shape == (1, 2, 50, 16)
    np.testing.assert_array_equal(np.array(runner.snapshot("3").layers[1].keys), np.array(short.layers[1].keys))


def test_memory_budget_holds_for_many_rows_of_mixed_lengths(model):
    """Reservations cover bucket rounding and the logits row of a step launched ahead: what the
    runner holds never exceeds the budget, while several rows still run at once."""
    budget = 4 << 20
    core = EngineCore(model, None, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=budget, max_num_seqs=16,
                                                prefill_tokens_per_step=512))
    assert core.scheduler.config.memory_budget_bytes == budget
    rng = np.random.default_rng(5)
    for i, n in enumerate([700, 12, 300, 40, 9, 260, 500, 30, 80, 5, 250, 20]):
        core.add(prompt(n, 100 + i), SamplingParams(max_tokens=int(rng.integers(4, 20)), temperature=0.0, ignore_eos=True))
    most = 0
    while core.has_work():
        core.step()
        most = max(most, len(core.runner.rows))
        assert core.runner.live_bytes() <= budget, (core.runner.live_bytes(), budget)
    assert most >= 3
    assert core.scheduler.reserved_bytes == 0


def test_bytes_per_token_and_per_sequence_from_first_principles(model):
    c = model.config
    runner = Runner(model)
    assert runner.kv_bytes_per_token() == kv_bytes(c, 1)
    n_lin = sum(t == "linear_attention" for t in c.layer_types)
    conv = (c.linear_conv_kernel_dim - 1) * (2 * c.linear_num_key_heads * c.linear_key_head_dim
                                             + c.linear_num_value_heads * c.linear_value_head_dim) * 4
    recurrent = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4
    logits_row = c.vocab_size * 4 + 4
    assert runner.state_bytes_per_seq() == n_lin * (conv + recurrent) + logits_row
