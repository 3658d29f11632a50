"""The shared-KV prefix cache on a real (tiny) model: answers equal a cache-less engine's across
branches (prompts diverging inside an edge), after eviction of ancestors' states, for sequences
sharing a prefix at once, and from the disk tier after a restart; the KV it holds is the distinct
tokens' KV from first principles."""

import mlx.core as mx
import numpy as np
import pytest
from fixtures import get_fixture

from model import load
from model.fingerprint import fingerprint, identity
from server.engine import EngineConfig, EngineCore, SamplingParams

FIXTURE = "moe_r3_fa2"
PARAMS = dict(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = load(get_fixture(FIXTURE).hf_dir, dtype="float32")
    mx.eval(model.parameters())
    return model, tokenizer


def core_for(lm, cache_bytes, **cfg):
    model, tok = lm
    # no decode step launched ahead: a finished request's state then covers its answer but the last token
    config = dict(prefix_cache_bytes=cache_bytes, block_size=16, memory_budget_bytes=1 << 30,
                  prefill_tokens_per_step=32, decode_ahead=False)
    return EngineCore(model, tok, EngineConfig(**{**config, **cfg}))


def run(core, prompts, arrive=None):
    """Greedy outputs of prompts submitted at the given steps, and each one's cached tokens."""
    events = {}
    core.emit = lambda d: events.setdefault(d.request_id, []).append(d)
    arrive = arrive or [0] * len(prompts)
    ids, step, pending = {}, 0, sorted(range(len(prompts)), key=lambda i: arrive[i])
    while pending or core.has_work():
        while pending and arrive[pending[0]] <= step:
            i = pending.pop(0)
            ids[i] = core.add(prompts[i], SamplingParams(**PARAMS)).id
        core.step()
        step += 1
    out = [events[ids[i]] for i in range(len(prompts))]
    return [[t for d in ds for t in d.token_ids] for ds in out], [ds[-1].usage.cached_tokens for ds in out]


def cold(lm, prompts):
    core = core_for(lm, 0)
    return [run(core, [p])[0][0] for p in prompts]


def rand(n, seed):
    return np.random.default_rng(seed).integers(100, 5000, size=n).tolist()


def kv_bytes_per_token(config) -> int:
    """K and V, per full-attention layer, float32: from the config alone."""
    n_full = sum(t == "full_attention" for t in config.layer_types)
    return n_full * 2 * config.num_key_value_heads * config.head_dim * 4


def test_branches_diverging_inside_an_edge_give_cold_answers(lm):
    trunk = rand(70, 1)
    a = trunk + rand(10, 2)
    b = trunk[:41] + rand(12, 3)  # leaves a's edge at 41: neither a block boundary nor a state
    c = trunk[:41] + rand(9, 4)  # a third branch at the same point
    d = a + rand(5, 5)  # a's prompt extended
    prompts = [a, b, c, d, b]
    core = core_for(lm, 1 << 28)
    out, cached = run(core, prompts, arrive=[0, 8, 16, 24, 32])
    assert out == cold(lm, prompts)
    # b resumes from nothing: a's checkpoint at 32 was thinned (two blocks back, and this model's
    # state weighs ~1.2k tokens of KV); c resumes where b left a's path, which b kept a state for
    assert cached[1] == 0 and cached[2] == 41
    assert cached[3] == len(a) and cached[4] == len(b)
    pc = core.prefix_cache
    # every distinct token fed (prompts, and the answers but their last token) held once, but a's
    # answer: d branched off beside it at a's end, so a's client did not continue it (dropped)
    fed = [p + o[:-1] for p, o in zip(prompts, out)]
    fed[0] = a
    distinct = {tuple(f[:i]) for f in fed for i in range(1, len(f) + 1)}
    assert pc.kv_tokens == len(distinct)
    assert_every_node_has_its_edges_kv(pc.root)
    assert pc.kv_bytes == len(distinct) * kv_bytes_per_token(lm[0].config)


def assert_every_node_has_its_edges_kv(node):
    for child in node.children.values():
        assert len(child.kv) == len(child.edge) and child.kv.nbytes > 0
        assert_every_node_has_its_edges_kv(child)


def test_evicting_ancestors_states_keeps_descendants_restorable(lm):
    first = rand(70, 6)
    longer = first + rand(20, 7)
    core = core_for(lm, 1 << 28)
    run(core, [first, longer], arrive=[0, 6])
    pc = core.prefix_cache
    assert sorted(n.depth for n in pc._lru.values())[:2] == [64, 70]  # a block checkpoint, first's end
    # full: the next request's states push the least recently used out, the ancestors' first
    pc.budget = pc.nbytes
    again = longer + rand(3, 8)
    assert run(core, [again]) == (cold(lm, [again]), [len(longer)])
    assert pc.evictions >= 2 and pc.nbytes <= pc.budget
    assert not pc.contains(first[:64]) and not pc.contains(first) and pc.contains(longer)
    assert_every_node_has_its_edges_kv(pc.root)
    # a resume through nodes that lost their states still finds all their KV
    more = longer + rand(4, 9)
    assert run(core, [more]) == (cold(lm, [more]), [len(longer)])


def test_concurrent_sequences_sharing_a_prefix(lm):
    shared = rand(48, 10)
    prompts = [shared + rand(n, 11 + n) for n in (5, 9, 14, 3)]
    core = core_for(lm, 1 << 28)
    out, cached = run(core, [shared + [7]] + prompts, arrive=[0, 3, 3, 4, 5])  # the later ones meet it mid-flight
    assert out == cold(lm, [shared + [7]] + prompts)
    assert all(c >= 32 for c in cached[1:])
    pc = core.prefix_cache
    assert pc.kv_bytes == pc.kv_tokens * kv_bytes_per_token(lm[0].config)
    assert pc.kv_tokens < sum(len(p) for p in prompts)  # the shared prefix once


@pytest.mark.parametrize("shared", [True, False])
def test_a_system_prompt_end_stays_for_other_conversations(lm, shared):
    """A point a request marks shared_at (a chat's system prompt + tools end: serving.chat_job) is kept
    however long its conversation grows past it, so the next conversation with the same system
    prompt resumes exactly there; unmarked, the checkpoints near it thin out and it resumes earlier."""
    system = rand(100, 20)  # not on a 16-token block boundary
    core = core_for(lm, 1 << 28)
    first = core.add(system + rand(400, 21), SamplingParams(**PARAMS), snapshot_at=(100,) * shared,
                     shared_at=(100,) * shared)
    while core.has_work():
        core.step()
    assert first.finish_reason == "length"
    out, cached = run(core, [system + rand(20, 22)])
    assert out == cold(lm, [system + rand(20, 22)])
    assert (cached[0] == 100) if shared else (cached[0] < 100)


def test_disk_tier_serves_a_restarted_engine(lm, tmp_path):
    model, _ = lm
    fp = fingerprint(identity(get_fixture(FIXTURE).hf_dir, model.compute_dtype))
    disk = dict(prefix_cache_dir=str(tmp_path), prefix_cache_disk_bytes=64 << 20, model_fingerprint=fp)
    prompt = rand(40, 20)
    first = core_for(lm, 1 << 28, **disk)
    (answer,), _ = run(first, [prompt])
    first.close()
    assert first.stats()["prefix_cache_disk"]["files"] >= 1
    second = core_for(lm, 1 << 28, **disk)  # a restart: an empty memory cache on the same directory
    follow = prompt + answer + rand(6, 21)
    out, cached = run(second, [follow])
    stats = second.stats()["prefix_cache_disk"]
    assert stats["hits"] == 1 and stats["read_bytes"] > 0
    assert cached[0] == len(prompt) + len(answer) - 1  # where the first engine's generation ended
    assert out == cold(lm, [follow])
    # the first prompt itself: its end is on disk with its next-token logits, so nothing is prefilled
    assert run(second, [prompt]) == ([answer], [len(prompt)])
    second.close()
    assert second.stats()["prefix_cache_disk"]["hits"] == 2
    # the same prompt once more after another restart, its files damaged: a cold answer, no crash
    for path in tmp_path.glob("*.safetensors"):
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
    third = core_for(lm, 1 << 28, **disk)
    out, cached = run(third, [follow])
    third.close()
    assert out == cold(lm, [follow]) and cached == [0]
    assert third.stats()["prefix_cache_disk"]["errors"] >= 1
