"""The radix tree on its own, with stand-in segments that are the tokens they cover: deepest state
on the path, edge splits splitting the KV, each token's KV held once, thinning, LRU eviction that
never strands a node without its ancestors' KV."""

import math

from server.engine.prefix_cache import PrefixCache

KV = 10  # bytes per token of a stand-in segment
STATE = 100


class Seg:
    def __init__(self, tokens):
        self.tokens = tuple(tokens)

    def __len__(self):
        return len(self.tokens)

    @property
    def nbytes(self):
        return KV * len(self.tokens)

    def split(self, n):
        return Seg(self.tokens[:n]), Seg(self.tokens[n:])


class State:
    nbytes = STATE

    def __init__(self, name=""):
        self.name = name


class Logits:
    nbytes = 7


def put(pc, tokens, name="", logits=None, kind="end"):
    """Insert as the engine does: KV only for the positions the tree lacks."""
    return pc.insert(tokens, Seg(tokens[pc.match(tokens):]), State(name), logits, kind)


def path(entry):
    return [t for seg in entry.segments for t in seg.tokens]


def test_deepest_state_on_the_path_and_its_kv():
    pc = PrefixCache(budget_bytes=10_000, block_size=4)
    put(pc, [1, 2, 3, 4], "a")
    put(pc, [1, 2, 3, 4, 5, 6, 7, 8], "b")
    put(pc, [1, 2, 9], "c")  # splits the edge after [1, 2]
    n, e = pc.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert (n, e.state.name, path(e)) == (8, "b", [1, 2, 3, 4, 5, 6, 7, 8])
    n, e = pc.lookup([1, 2, 3, 4, 5, 6])
    assert (n, e.state.name, path(e)) == (4, "a", [1, 2, 3, 4])
    n, e = pc.lookup([1, 2, 9, 9])
    assert (n, e.state.name, path(e)) == (3, "c", [1, 2, 9])
    assert [len(s) for s in e.segments] == [2, 1]  # the split edge's KV was split with it
    assert pc.lookup([1, 2, 3]) == (0, None)
    assert pc.lookup([7]) == (0, None)
    # each distinct token's KV once: 1 2 3 4 5 6 7 8 9
    assert pc.kv_tokens == 9 and pc.kv_bytes == 9 * KV
    assert pc.nbytes == 9 * KV + 3 * STATE


def test_match_counts_kv_inside_an_edge():
    pc = PrefixCache(budget_bytes=10_000)
    put(pc, [1, 2, 3, 4, 5])
    assert pc.match([1, 2, 3, 9]) == 3 and pc.match([1, 2, 3, 4, 5, 6]) == 5 and pc.match([2]) == 0
    assert pc.resumable([1, 2, 3, 4, 5, 6]) == 5 and pc.lookups == 0
    put(pc, [1, 2, 3])  # a state inside the edge: no new KV
    assert pc.kv_tokens == 5 and pc.lookup([1, 2, 3, 7])[0] == 3


def test_full_match_needs_logits():
    pc = PrefixCache(budget_bytes=1000)
    put(pc, [1, 2, 3], "no-logits")
    assert pc.lookup([1, 2, 3]) == (0, None)
    put(pc, [1, 2, 3], "with", logits=Logits())
    n, e = pc.lookup([1, 2, 3])
    assert (n, e.state.name) == (3, "with") and e.logits is not None
    assert pc.nbytes == 3 * KV + STATE + Logits.nbytes and len(pc) == 1


def test_lru_eviction_under_budget_counts_kv_and_states():
    pc = PrefixCache(budget_bytes=3 * (2 * KV + STATE) - 1)
    put(pc, [1, 1], "a")
    put(pc, [2, 2], "b")
    pc.lookup([1, 1, 5])  # touch a
    put(pc, [3, 3], "c")  # evicts b, the least recently used
    assert pc.lookup([2, 2, 5]) == (0, None)
    assert pc.lookup([1, 1, 5])[1].state.name == "a"
    assert pc.lookup([3, 3, 5])[1].state.name == "c"
    assert pc.nbytes == 2 * (2 * KV + STATE) and pc.evictions == 1
    assert not put(pc, [4] * 60)  # bigger than the budget on its own
    assert pc.root.children.keys() == {1, 3}  # the evicted branch was pruned, its KV with it
    assert pc.kv_tokens == 4


def test_evicting_an_ancestor_keeps_the_kv_its_descendants_need():
    pc = PrefixCache(budget_bytes=1000)
    put(pc, [1, 2, 3, 4], "parent")
    put(pc, [1, 2, 3, 4, 5, 6], "child")
    put(pc, [1, 2, 3, 4, 7, 8], "sibling")
    pc.budget = pc.nbytes - 1  # the parent's state is the least recently used
    put(pc, [1, 2, 3, 4, 5, 6], "child")  # re-insert: evicts
    assert pc.evictions == 1 and not pc.contains([1, 2, 3, 4])
    n, e = pc.lookup([1, 2, 3, 4, 5, 6, 0])
    assert (n, path(e)) == (6, [1, 2, 3, 4, 5, 6])  # the whole path's KV is still there
    assert pc.lookup([1, 2, 3, 4, 9]) == (0, None)
    # dropping every other state drops every other node, and all their KV with them
    pc.budget = KV + STATE
    put(pc, [9], "tiny")
    assert pc.kv_tokens == 1 and pc.nbytes == KV + STATE and pc.root.children.keys() == {9}


def test_block_checkpoints_thin_out_dense_near_the_end():
    pc = PrefixCache(budget_bytes=1 << 30, block_size=4, checkpoint=8)
    tokens = list(range(1000, 1200))
    for end in range(4, 200, 4):
        put(pc, tokens[:end], kind="block")
    put(pc, tokens, kind="end")
    kept = sorted(n.depth for n in pc._lru.values())
    # e = 200: distance < 2 blocks -> 196; then every 8 below distance 32, every 16 below 64, ...
    # (two per doubling of the distance), from first principles:
    expected = []
    for d in range(4, 200, 4):
        dist = 200 - d
        if dist < 8 or d % (8 * 2 ** max(0, int(math.log2(dist / 8)) - 1)) == 0:
            expected.append(d)
    assert kept == expected + [200]
    assert len(kept) <= 2 * (200 // 8).bit_length() + 2
    assert pc.kv_tokens == 200  # thinning frees states, never KV on the path


def test_shared_points_stay_pins_thin_out_left_generations_go():
    pc = PrefixCache(budget_bytes=1 << 30, block_size=4, checkpoint=4)
    tokens = list(range(100, 300))
    put(pc, tokens[:10], kind="shared")  # where another prompt left this path
    put(pc, tokens[:13], kind="pin")  # a chat's history end
    put(pc, tokens[:13] + [1, 2], kind="gen")  # its answer, as generated
    put(pc, tokens[:13] + [5], kind="end")  # the next turn re-rendered the answer: the generation is left
    assert not pc.contains(tokens[:13] + [1, 2]) and pc.match(tokens[:13] + [1, 2]) == 13
    assert pc.contains(tokens[:13])
    put(pc, tokens, kind="end")
    assert pc.contains(tokens[:10])  # shared: never thinned
    assert not pc.contains(tokens[:13])  # far back and off the checkpoint grid


def test_disabled_cache_stores_nothing():
    pc = PrefixCache(budget_bytes=0)
    assert not put(pc, [1, 2], "a")
    assert pc.lookup([1, 2, 3]) == (0, None)
    assert pc.stats()["entries"] == 0


def test_hit_rate_counts_tokens():
    pc = PrefixCache(budget_bytes=1000)
    put(pc, [1, 2, 3, 4], "a")
    pc.lookup([1, 2, 3, 4, 5, 6, 7, 8])
    pc.lookup([9, 9, 9, 9, 9, 9, 9, 9])
    s = pc.stats()
    assert s["hit_rate"] == 4 / 16 and s["hits"] == 1 and s["lookups"] == 2


def test_checkpoint_spacing_is_sized_to_the_state():
    # a state as heavy as 6k tokens of KV (Qwen3.5-397B-like) -> checkpoints every 24 blocks of 256
    assert PrefixCache.checkpoint_for(256, 190 << 20, 30 << 10) == 256 * 25
    assert PrefixCache.checkpoint_for(256, 77824, 1024) == 256  # the demo model: lighter than a block
