"""A radix tree over token ids whose nodes hold snapshots of a sequence's full model state.

Recurrent (GatedDeltaNet) state cannot be rewound, so a prompt can resume only from a point
where a snapshot was taken: block boundaries during prefill, the end of every prompt, the end
of every generation. `lookup` returns the deepest such point on the prompt's path.
Snapshots are opaque here (anything with a byte size); eviction is LRU under a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Entry:
    snapshot: Any
    nbytes: int
    logits: Any = None  # next-token logits at this point, so a full hit needs no recompute


@dataclass(eq=False)
class _Node:
    edge: tuple = ()
    parent: Optional["_Node"] = None
    children: dict = field(default_factory=dict)
    entry: Optional[Entry] = None

    @property
    def depth(self) -> int:
        n, d = self, 0
        while n is not None:
            d += len(n.edge)
            n = n.parent
        return d


class PrefixCache:
    def __init__(self, budget_bytes: int, block_size: int = 256):
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.budget = max(0, int(budget_bytes))
        self.block_size = block_size
        self.root = _Node()
        self._lru: OrderedDict[int, _Node] = OrderedDict()
        self.nbytes = 0
        self.lookups = self.hits = self.tokens_queried = self.tokens_hit = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self._lru)

    def _walk(self, tokens):
        """Yield (node, depth) for every node whose whole path is a prefix of tokens."""
        node, depth = self.root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                return
            n = len(child.edge)
            if tuple(tokens[depth : depth + n]) != child.edge:
                return
            node, depth = child, depth + n
            yield node, depth

    def lookup(self, tokens: list[int]) -> tuple[int, Optional[Entry]]:
        """Deepest snapshot on tokens' path. A snapshot covering all tokens counts only if it
        carries logits (the next token must be sampled from something)."""
        best, best_depth = None, 0
        if self.enabled:
            for node, depth in self._walk(tokens):
                if node.entry is not None and (depth < len(tokens) or node.entry.logits is not None):
                    best, best_depth = node, depth
        self.lookups += 1
        self.tokens_queried += len(tokens)
        if best is None:
            return 0, None
        self.hits += 1
        self.tokens_hit += best_depth
        self._lru.move_to_end(id(best))
        return best_depth, best.entry

    def contains(self, tokens: list[int]) -> bool:
        for node, depth in self._walk(tokens):
            if depth == len(tokens):
                return node.entry is not None
        return False

    def insert(self, tokens: list[int], snapshot: Any, nbytes: int, logits: Any = None) -> bool:
        """Store a snapshot of the state after `tokens`. Returns False if it cannot fit."""
        if not self.enabled or not tokens or nbytes > self.budget:
            return False
        node = self._node_at(list(tokens))
        if node.entry is not None:
            self.nbytes -= node.entry.nbytes
        node.entry = Entry(snapshot, nbytes, logits)
        self.nbytes += nbytes
        self._lru[id(node)] = node
        self._lru.move_to_end(id(node))
        self._evict()
        return True

    def _node_at(self, tokens: list[int]) -> _Node:
        node, depth = self.root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                leaf = _Node(tuple(tokens[depth:]), node)
                node.children[tokens[depth]] = leaf
                return leaf
            common = 0
            limit = min(len(child.edge), len(tokens) - depth)
            while common < limit and child.edge[common] == tokens[depth + common]:
                common += 1
            if common < len(child.edge):  # split the edge at the divergence point
                mid = _Node(child.edge[:common], node)
                node.children[tokens[depth]] = mid
                child.edge = child.edge[common:]
                child.parent = mid
                mid.children[child.edge[0]] = child
                child = mid
            node, depth = child, depth + common
        return node

    def _evict(self) -> None:
        while self.nbytes > self.budget and self._lru:
            _, node = self._lru.popitem(last=False)
            self.nbytes -= node.entry.nbytes
            node.entry = None
            self.evictions += 1
            self._prune(node)

    def _prune(self, node: _Node) -> None:
        while node is not self.root and node.entry is None and not node.children:
            parent = node.parent
            del parent.children[node.edge[0]]
            node = parent

    def clear(self) -> None:
        self.__init__(self.budget, self.block_size)

    def stats(self) -> dict:
        return {
            "entries": len(self._lru),
            "bytes": self.nbytes,
            "budget_bytes": self.budget,
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": self.tokens_hit / self.tokens_queried if self.tokens_queried else 0.0,
            "tokens_hit": self.tokens_hit,
            "evictions": self.evictions,
        }
