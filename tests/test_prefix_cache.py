"""The radix tree on its own: longest snapshot on the path, edge splits, LRU under a byte budget."""

from server.engine.prefix_cache import PrefixCache


def test_deepest_snapshot_on_the_path():
    pc = PrefixCache(budget_bytes=1000, block_size=4)
    pc.insert([1, 2, 3, 4], "a", 10)
    pc.insert([1, 2, 3, 4, 5, 6, 7, 8], "b", 10)
    pc.insert([1, 2, 9], "c", 10)  # splits the edge after [1, 2]
    assert pc.lookup([1, 2, 3, 4, 5, 6, 7, 8, 9]) == (8, pc.lookup([1, 2, 3, 4, 5, 6, 7, 8, 0])[1])
    n, e = pc.lookup([1, 2, 3, 4, 5, 6])
    assert (n, e.snapshot) == (4, "a")
    n, e = pc.lookup([1, 2, 9, 9])
    assert (n, e.snapshot) == (3, "c")
    assert pc.lookup([1, 2, 3]) == (0, None)
    assert pc.lookup([7]) == (0, None)


def test_full_match_needs_logits():
    pc = PrefixCache(budget_bytes=1000)
    pc.insert([1, 2, 3], "no-logits", 10)
    assert pc.lookup([1, 2, 3]) == (0, None)
    pc.insert([1, 2, 3], "with", 10, logits=[0.5])
    n, e = pc.lookup([1, 2, 3])
    assert (n, e.snapshot, e.logits) == (3, "with", [0.5])
    assert pc.nbytes == 10 and len(pc) == 1


def test_lru_eviction_under_budget():
    pc = PrefixCache(budget_bytes=25)
    pc.insert([1, 1], "a", 10)
    pc.insert([2, 2], "b", 10)
    pc.lookup([1, 1, 5])  # touch a
    pc.insert([3, 3], "c", 10)  # evicts b, the least recently used
    assert pc.lookup([2, 2, 5]) == (0, None)
    assert pc.lookup([1, 1, 5])[1].snapshot == "a"
    assert pc.lookup([3, 3, 5])[1].snapshot == "c"
    assert pc.nbytes == 20 and pc.evictions == 1
    assert not pc.insert([4], "too big", 26)
    assert pc.root.children.keys() == {1, 3}  # the evicted branch was pruned


def test_disabled_cache_stores_nothing():
    pc = PrefixCache(budget_bytes=0)
    assert not pc.insert([1, 2], "a", 1)
    assert pc.lookup([1, 2, 3]) == (0, None)
    assert pc.stats()["entries"] == 0


def test_hit_rate_counts_tokens():
    pc = PrefixCache(budget_bytes=100)
    pc.insert([1, 2, 3, 4], "a", 1)
    pc.lookup([1, 2, 3, 4, 5, 6, 7, 8])
    pc.lookup([9, 9, 9, 9, 9, 9, 9, 9])
    s = pc.stats()
    assert s["hit_rate"] == 4 / 16 and s["hits"] == 1 and s["lookups"] == 2
