"""A radix tree over token ids holding each cached token's KV once, and the recurrent state at a
bounded set of points.

A node's edge is the run of tokens it adds to its parent's path, and the node holds the KV of
exactly those positions (a segment); restoring a point concatenates the segments from the root.
So the KV part of the cache is the size of the distinct tokens it holds, however many sequences
share them. An edge split splits its segment (both halves copied, so neither keeps the other's
buffer alive).

Recurrent (GatedDeltaNet) and conv state cannot be rewound, so a prompt resumes only from a node
holding a state: `lookup` returns the deepest one on the prompt's path (at the prompt's very end
only with the next-token logits). One state weighs as much as the KV of `state_bytes /
kv_bytes_per_token` tokens (the demo model: 76; Qwen3.5-397B: ~6k; the tests' fixtures: ~1.2k),
so the rule is sized to it: B0 (`checkpoint`) = the block size times max(1, round(state bytes /
KV bytes of a block)). States are taken at block boundaries, prompt ends (with logits),
generation ends, the points a request asks for (`snapshot_at`: a chat's history end), the last
block boundary before a prompt's end, and where a prompt leaves a cached path or a request says
others share its prefix (`shared_at`: a chat's system prompt and tools end) ("shared": the next
prompt sharing that prefix, e.g. another conversation after the same system prompt and tools,
resumes there). When a state is inserted at depth e, each state on its path at depth d
stays if
- it is "shared" (never thinned; LRU only), or
- e - d < 2 blocks, or e - d < 2 B0 for anything but a block checkpoint (dense near the end), or
- d is a multiple of B0 * 2^max(0, floor(log2((e - d) / B0)) - 1): two per doubling of the
  distance further back.
A sequence of n tokens so keeps ~2 log2(n / B0) + 4 states whatever its number of turns, and a
prompt leaving it x tokens before its end re-prefills at most ~x / 2 tokens (x itself below 2
B0). A generation's end that a new branch leaves beside it is dropped: its client did not
continue it (a chat template re-renders the answer).
Measured trade-off on the demo model (a 9-turn agent conversation, ~1k-token system prompt,
3.9k tokens at the end): the cache holds 1.17x the conversation's state (10 states; was 16x,
growing with the square of the context, with a full snapshot per point); each turn resumes at
the previous history end; a new question after a shared 900-token prefix resumes at 768 (the
last block before the first prompt's end: 0.20x of cold; was 512, 0.55-0.77x) and, from the
second such prompt on, at the divergence point (890: 0.07-0.12x).

Eviction is LRU over the states under a byte budget that counts everything held (KV segments,
states, logits). Dropping a state prunes the nodes left with no state and no children, so a
node's KV goes only once nothing below it needs it: no node outlives its ancestors' KV.

Plain Python: segments, states and logits are opaque here. A segment has `nbytes`, `len()` (its
positions) and `split(n) -> (head, tail)`; a state and logits have `nbytes`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


# which kind a state keeps when a point is inserted again
_RANK = {"block": 0, "gen": 1, "end": 2, "pin": 3, "shared": 4}


@dataclass
class Entry:
    """A resumable point: restore = the segments' KV concatenated, then the state."""

    depth: int
    segments: list  # the path's KV segments, root first; their lengths sum to depth
    state: Any
    logits: Any = None  # next-token logits at this point, so a full hit needs no recompute


@dataclass(eq=False)
class _Node:
    edge: tuple = ()
    parent: Optional["_Node"] = None
    kv: Any = None  # the KV of the edge's positions
    children: dict = field(default_factory=dict)
    state: Any = None
    logits: Any = None
    kind: str = ""  # of its state (see PrefixCache.insert)
    depth: int = 0



class PrefixCache:
    def __init__(self, budget_bytes: int, block_size: int = 256, checkpoint: int | None = None,
                 on_evict: Callable[[list, Entry], None] | None = None):
        if block_size < 1:
            raise ValueError("block_size must be positive")
        self.budget = max(0, int(budget_bytes))
        self.block_size = block_size
        self.checkpoint = checkpoint or block_size  # B0 (see the module docstring)
        self.on_evict = on_evict  # (tokens, entry) of each state LRU eviction is about to drop
        # what a segment, state or logits array counts against the budget: its bytes, unless set
        # (ranks in lockstep weigh with numbers they agreed on, so that they evict alike)
        self.weigh: Callable[[Any], int] = lambda x: x.nbytes
        if self.checkpoint % block_size:
            raise ValueError("checkpoint must be a multiple of block_size")
        self.root = _Node()
        self._lru: OrderedDict[int, _Node] = OrderedDict()  # the nodes holding a state
        self.nbytes = self.kv_bytes = self.kv_tokens = 0
        self.lookups = self.hits = self.tokens_queried = self.tokens_hit = self.evictions = self.thinned = 0

    @staticmethod
    def checkpoint_for(block_size: int, state_bytes: int, kv_bytes_per_token: int) -> int:
        """B0: a multiple of the block size whose KV weighs about one state."""
        return block_size * max(1, round(state_bytes / max(1, kv_bytes_per_token * block_size)))

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self._lru)

    def _walk(self, tokens):
        """Yield every node whose whole path is a prefix of tokens."""
        node, depth = self.root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                return
            n = len(child.edge)
            if tuple(tokens[depth : depth + n]) != child.edge:
                return
            node, depth = child, depth + n
            yield node

    def match(self, tokens) -> int:
        """How many leading tokens have their KV here (a match may end inside an edge)."""
        node, depth = self.root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                break
            common = _common(child.edge, tokens, depth)
            depth += common
            if common < len(child.edge):
                break
            node = child
        return depth

    def _best(self, tokens) -> Optional[_Node]:
        best = None
        for node in self._walk(tokens):
            if node.state is not None and (node.depth < len(tokens) or node.logits is not None):
                best = node
        return best

    def resumable(self, tokens) -> int:
        """`lookup`'s depth without counting a lookup or touching the LRU order."""
        best = self._best(tokens) if self.enabled else None
        return best.depth if best is not None else 0

    def lookup(self, tokens: list[int]) -> tuple[int, Optional[Entry]]:
        """Deepest state on tokens' path. One covering all tokens counts only if it carries
        logits (the next token must be sampled from something)."""
        best = self._best(tokens) if self.enabled else None
        self.lookups += 1
        self.tokens_queried += len(tokens)
        if best is None:
            return 0, None
        self.hits += 1
        self.tokens_hit += best.depth
        self._lru.move_to_end(id(best))
        return best.depth, self.entry(best)

    @staticmethod
    def entry(node: _Node) -> Entry:
        segments, n = [], node
        while n.parent is not None:
            segments.append(n.kv)
            n = n.parent
        return Entry(node.depth, segments[::-1], node.state, node.logits)

    def entry_at(self, tokens: list[int]) -> Optional[Entry]:
        """The state held exactly at the end of tokens, as an Entry (None if there is none)."""
        for node in self._walk(tokens):
            if node.depth == len(tokens) and node.state is not None:
                return self.entry(node)
        return None

    def contains(self, tokens: list[int]) -> bool:
        """A state is held exactly at the end of tokens."""
        for node in self._walk(tokens):
            if node.depth == len(tokens):
                return node.state is not None
        return False

    def insert(self, tokens: list[int], kv: Any, state: Any, logits: Any = None, kind: str = "end") -> bool:
        """Store the state after `tokens`; `kv` holds the KV of positions [match(tokens),
        len(tokens)) (nothing when the path is already here). kind: "shared" (where a prompt left a
        cached path: never thinned), "pin" (a point a request asked for), "end" (a prompt's end),
        "gen" (a generation's end) or "block" (a block checkpoint). Returns False if it cannot fit."""
        if not self.enabled or not tokens:
            return False
        start = self.match(tokens)
        assert len(kv) == len(tokens) - start, (len(kv), len(tokens), start)
        added = (self.weigh(kv) if start < len(tokens) else 0) + self.weigh(state) + (
            self.weigh(logits) if logits is not None else 0)
        if added > self.budget:
            return False
        node = self._node_at(list(tokens), kv)
        if _RANK.get(node.kind, 0) > _RANK[kind]:
            kind = node.kind
        self._drop_state(node)
        node.state, node.logits, node.kind = state, logits, kind
        self.nbytes += self._state_bytes(node)
        self._lru[id(node)] = node
        self._drop_left_generations(node)
        self._thin(node)
        self._evict()
        return True

    def _state_bytes(self, node: _Node) -> int:
        return (self.weigh(node.state) if node.state is not None else 0) + (
            self.weigh(node.logits) if node.logits is not None else 0)

    def _add_kv(self, node: _Node, kv: Any, sign: int = 1) -> None:
        self.nbytes += sign * self.weigh(kv)
        self.kv_bytes += sign * self.weigh(kv)
        self.kv_tokens += sign * len(kv)

    def _node_at(self, tokens: list[int], kv: Any) -> _Node:
        node, depth = self.root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                leaf = _Node(tuple(tokens[depth:]), node, kv, depth=len(tokens))
                node.children[tokens[depth]] = leaf
                self._add_kv(leaf, kv)
                return leaf
            common = _common(child.edge, tokens, depth)
            if common < len(child.edge):  # split the edge (and its KV) at the divergence point
                head, tail = child.kv.split(common)
                self._add_kv(child, child.kv, -1)
                mid = _Node(child.edge[:common], node, head, depth=depth + common)
                node.children[tokens[depth]] = mid
                child.edge, child.kv, child.parent = child.edge[common:], tail, mid
                mid.children[child.edge[0]] = child
                self._add_kv(mid, head)
                self._add_kv(child, tail)
                child = mid
            node, depth = child, depth + common
        return node

    def _keeps(self, node: _Node, e: int) -> bool:
        """Whether a state stays under a new state at depth e (see the docstring)."""
        d, b0 = node.depth, self.checkpoint
        dist = e - d
        if dist < 2 * self.block_size or (node.kind != "block" and dist < 2 * b0):
            return True
        level = max(0, (dist // b0).bit_length() - 2)  # floor(log2(dist / b0)) - 1
        return d % (b0 << level) == 0

    def _thin(self, node: _Node) -> None:
        n = node.parent
        while n is not None and n is not self.root:
            parent = n.parent
            if n.state is not None and n.kind != "shared" and not self._keeps(n, node.depth):
                self._drop_state(n)  # n has a child (on the way to node): its KV stays
                self.thinned += 1
            n = parent

    def _drop_left_generations(self, node: _Node) -> None:
        """A generation's end that a new path branches away from beside it is one its client did
        not continue (a chat template re-renders the answer): drop it."""
        parent = node.parent
        for sibling in list(parent.children.values()) if parent is not None else ():
            if sibling is not node and sibling.kind == "gen" and not sibling.children:
                self._drop_state(sibling)
                self.thinned += 1
                self._prune(sibling)

    def _drop_state(self, node: _Node) -> None:
        if node.state is None:
            return
        self.nbytes -= self._state_bytes(node)
        node.state = node.logits = None
        node.kind = ""
        del self._lru[id(node)]

    def _evict(self) -> None:
        while self.nbytes > self.budget and self._lru:
            node = next(iter(self._lru.values()))
            if self.on_evict is not None:
                self.on_evict(self._tokens(node), self.entry(node))
            self._drop_state(node)
            self.evictions += 1
            self._prune(node)

    @staticmethod
    def _tokens(node: _Node) -> list:
        edges = []
        while node.parent is not None:
            edges.append(node.edge)
            node = node.parent
        return [t for edge in reversed(edges) for t in edge]

    def _prune(self, node: _Node) -> None:
        """Remove nodes that hold no state and have nothing below: their KV serves no one."""
        while node is not self.root and node.state is None and not node.children:
            parent = node.parent
            del parent.children[node.edge[0]]
            self._add_kv(node, node.kv, -1)
            node = parent

    def clear(self) -> None:
        self.__init__(self.budget, self.block_size, self.checkpoint, self.on_evict)

    def stats(self) -> dict:
        return {
            "entries": len(self._lru),
            "bytes": self.nbytes,
            "kv_bytes": self.kv_bytes,
            "kv_tokens": self.kv_tokens,
            "budget_bytes": self.budget,
            "lookups": self.lookups,
            "hits": self.hits,
            "hit_rate": self.tokens_hit / self.tokens_queried if self.tokens_queried else 0.0,
            "tokens_hit": self.tokens_hit,
            "evictions": self.evictions,
            "thinned": self.thinned,
        }


def _common(edge: tuple, tokens, depth: int) -> int:
    """How many of edge's tokens tokens[depth:] starts with."""
    n = min(len(edge), len(tokens) - depth)
    if tuple(tokens[depth : depth + n]) == edge[:n]:  # the usual case, compared in C
        return n
    common = 0
    while edge[common] == tokens[depth + common]:
        common += 1
    return common
