"""Per-sequence model state with a batch dimension: KV for full attention, conv + recurrent state
for GatedDeltaNet. Rows may hold sequences of different lengths (`offsets`)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import mlx.core as mx

KV_STEP = 256


@dataclass
class KVLayer:
    keys: mx.array  # [B, Hkv, capacity, D]
    values: mx.array

    def update(self, k: mx.array, v: mx.array, offsets: list[int]) -> tuple[mx.array, mx.array]:
        """Write k, v [B, Hkv, T, D] at each row's offset; return keys/values up to the longest row."""
        B, H, T, D = k.shape
        end = max(offsets) + T
        cap = self.keys.shape[2]
        if end > cap:
            grow = -(-(end - cap) // KV_STEP) * KV_STEP
            pad = [(0, 0), (0, 0), (0, grow), (0, 0)]
            self.keys = mx.pad(self.keys, pad)
            self.values = mx.pad(self.values, pad)
        if len(set(offsets)) == 1:
            o = offsets[0]
            self.keys[:, :, o : o + T] = k.astype(self.keys.dtype)
            self.values[:, :, o : o + T] = v.astype(self.values.dtype)
        else:
            pos = mx.array(offsets)[:, None] + mx.arange(T)
            idx = mx.broadcast_to(pos[:, None, :, None], (B, H, T, D))
            self.keys = mx.put_along_axis(self.keys, idx, k.astype(self.keys.dtype), axis=2)
            self.values = mx.put_along_axis(self.values, idx, v.astype(self.values.dtype), axis=2)
        return self.keys[:, :, :end], self.values[:, :, :end]

    def take(self, rows: mx.array, length: int, start: int = 0) -> "KVLayer":
        # Slice, then gather: the gather then copies exactly [rows, H, length - start, D]. Gathering
        # first and slicing after leaves a view that keeps every row's whole capacity alive.
        return KVLayer(self.keys[:, :, start:length][rows], self.values[:, :, start:length][rows])

    @staticmethod
    def concat(layers: list["KVLayer"]) -> "KVLayer":
        cap = max(layer.keys.shape[2] for layer in layers)

        def fit(x):
            return mx.pad(x, [(0, 0), (0, 0), (0, cap - x.shape[2]), (0, 0)]) if x.shape[2] < cap else x

        return KVLayer(
            mx.concatenate([fit(layer.keys) for layer in layers]),
            mx.concatenate([fit(layer.values) for layer in layers]),
        )

    def arrays(self) -> list[mx.array]:
        return [self.keys, self.values]


@dataclass
class LinearLayer:
    conv: mx.array  # [B, kernel - 1, conv channels]: the last inputs of the causal conv
    state: mx.array  # [B, Hv, Dk, Dv] float32
    # after a verify forward (keep_states): (conv window [B, kernel - 1 + T, C], state after each
    # position [B, T, Hv, Dk, Dv]), what `rollback` picks from; None otherwise
    steps: tuple | None = None

    def rollback(self, kept: mx.array) -> None:
        """Row b's state as after its first kept[b] (>= 1) positions of the verify forward."""
        window, states = self.steps
        self.state = states[mx.arange(states.shape[0]), kept - 1]
        pos = kept[:, None] + mx.arange(self.conv.shape[1])
        self.conv = mx.take_along_axis(window, pos[..., None], axis=1).astype(self.conv.dtype)
        self.steps = None

    def take(self, rows: mx.array, length: int, start: int = 0) -> "LinearLayer":
        return LinearLayer(self.conv[rows], self.state[rows])

    @staticmethod
    def concat(layers: list["LinearLayer"]) -> "LinearLayer":
        return LinearLayer(
            mx.concatenate([layer.conv for layer in layers]),
            mx.concatenate([layer.state for layer in layers]),
        )

    def arrays(self) -> list[mx.array]:
        return [self.conv, self.state]


class Cache:
    """State of B sequences; row b has seen offsets[b] tokens."""

    def __init__(self, layers: list[KVLayer | LinearLayer], offsets: list[int]):
        self.layers = layers
        self.offsets = list(offsets)

    @property
    def batch_size(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes these arrays hold, spare KV capacity and padded rows included. Every array here
        owns its buffer (`select` copies), so this is the memory the cache keeps alive."""
        return sum(a.nbytes for a in self.state())

    def select(self, rows: list[int], kv_from: int = 0) -> "Cache":
        """A new cache holding copies of the given rows (in that order). With `kv_from`, the KV
        layers hold only positions [kv_from, offset) (a segment; offsets still count from 0)."""
        if not rows:
            raise ValueError("select needs at least one row")
        offsets = [self.offsets[r] for r in rows]
        idx = mx.array(rows)
        layers = [layer.take(idx, max(offsets), kv_from) for layer in self.layers]
        return Cache(layers, offsets)

    def snapshot(self, row: int, kv_from: int = 0) -> "Cache":
        """One sequence's state as a batch-1 cache, independent of this one (evaluated); its KV
        from position `kv_from` on (see `select`)."""
        snap = self.select([row], kv_from)
        mx.eval([a for layer in snap.layers for a in layer.arrays()])
        return snap

    @staticmethod
    def concat(caches: list["Cache"]) -> "Cache":
        """Stack the rows of several caches (e.g. restored snapshots) into one batch."""
        if not caches:
            raise ValueError("concat needs at least one cache")
        layers = [type(group[0]).concat(list(group)) for group in zip(*(c.layers for c in caches))]
        return Cache(layers, [o for c in caches for o in c.offsets])

    def state(self) -> list[mx.array]:
        return [a for layer in self.layers for a in layer.arrays()]

    def rollback(self, kept: list[int], fed: list[int]) -> None:
        _rollback(self, kept, fed)


def _rollback(cache, kept: list[int], fed: list[int]) -> None:
    """After a verify forward (keep_states) that fed fed[b] positions to row b: keep its first
    kept[b] (1 <= kept <= fed). Recurrent and conv state come from the kept position; KV past it
    stays in place, masked, until the next forward overwrites it."""
    if len(kept) != cache.batch_size or any(not 1 <= k <= f for k, f in zip(kept, fed)):
        raise ValueError(f"kept {kept} must be 1..fed {fed} per row")
    index = mx.array(kept)
    for layer in cache.layers:
        if isinstance(layer, LinearLayer):
            layer.rollback(index)
    cache.offsets = [o - f + k for o, k, f in zip(cache.offsets, kept, fed)]


def kv_capacity(tokens: int) -> int:
    """KV positions the decode batch gives a row that must hold `tokens`: a ladder of multiples of
    KV_STEP growing by a quarter, so a row's capacity is at most one KV_STEP over its length below
    512 tokens, 1.5x from 512, 1.4x from 1k, ~1.27x from 4k, while a growing row moves to a larger
    bucket only O(log length) times (25 rungs up to 128k)."""
    cap = KV_STEP
    while cap < tokens:
        cap = max(cap + KV_STEP, -(-cap * 5 // (4 * KV_STEP)) * KV_STEP)
    return cap


@dataclass
class Bucket:
    """Decode rows that share one KV capacity: [len(rows), Hkv, capacity, D] per attention layer."""

    capacity: int
    rows: list[int]  # batch rows, in the order of this bucket's KV rows
    kv: list[KVLayer]  # one per full-attention layer


class BucketedKV:
    """One full-attention layer's view of a DecodeBatch: each bucket's rows and its KV for this layer."""

    def __init__(self, owner: "DecodeBatch", index: int):
        # a weak reference: a strong one is a cycle that keeps a released batch's KV alive until
        # Python's cycle collector happens to run
        self._owner, self.index = weakref.ref(owner), index

    def parts(self) -> list[tuple[list[int], KVLayer]]:
        return [(b.rows, b.kv[self.index]) for b in self._owner().buckets]


class DecodeBatch:
    """The decode rows' state. Linear layers hold every row ([B, ...], in row order); KV is held per
    length bucket (`kv_capacity` of each row's length), so a short row is never padded to a long
    row's length, attention runs per bucket over that bucket's keys only, and joining, leaving or
    outgrowing a bucket copies that bucket's KV, not every row's. Quacks like a Cache for
    Model.__call__ (`layers`, `offsets`, `batch_size`)."""

    def __init__(self, first: Cache):
        self.offsets: list[int] = []
        self.buckets: list[Bucket] = []
        self.layers: list[LinearLayer | BucketedKV] = []
        n_kv = 0
        for layer in first.layers:
            if isinstance(layer, KVLayer):
                self.layers.append(BucketedKV(self, n_kv))
                n_kv += 1
            else:
                self.layers.append(LinearLayer(layer.conv[:0], layer.state[:0]))
        self.join(first)

    @property
    def batch_size(self) -> int:
        return len(self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes held, each bucket's spare capacity included (every array owns its buffer)."""
        return sum(a.nbytes for a in self.state())

    def state(self) -> list[mx.array]:
        linear = [a for layer in self.layers if isinstance(layer, LinearLayer) for a in layer.arrays()]
        return linear + [a for b in self.buckets for kv in b.kv for a in kv.arrays()]

    def _kv(self, cache: Cache) -> list[KVLayer]:
        return [layer for layer in cache.layers if isinstance(layer, KVLayer)]

    def _place(self, kv: list[KVLayer], offsets: list[int], rows: list[int], capacity: int) -> None:
        """Add rows (their KV [n, H, >= max offset, D]) to the bucket of `capacity`, copying only it."""
        n = max(offsets)
        fitted = [KVLayer(*(mx.pad(a[:, :, :n], [(0, 0), (0, 0), (0, capacity - n), (0, 0)])
                            for a in (layer.keys, layer.values))) for layer in kv]
        bucket = next((b for b in self.buckets if b.capacity == capacity), None)
        if bucket is None:
            self.buckets.append(Bucket(capacity, list(rows), fitted))
            self.buckets.sort(key=lambda b: b.capacity)
        else:
            bucket.kv = [KVLayer.concat([old, new]) for old, new in zip(bucket.kv, fitted)]
            bucket.rows += rows

    def join(self, cache: Cache) -> None:
        """Append the rows of `cache` (a Cache, e.g. a finished prefill's) after the current rows."""
        first = self.batch_size
        linear = [layer for layer in cache.layers if isinstance(layer, LinearLayer)]
        mine = [layer for layer in self.layers if isinstance(layer, LinearLayer)]
        for own, new in zip(mine, linear):
            own.conv = mx.concatenate([own.conv, new.conv])
            own.state = mx.concatenate([own.state, new.state])
        kv = self._kv(cache)
        for i, o in enumerate(cache.offsets):
            self._place([layer.take(mx.array([i]), o) for layer in kv] if cache.batch_size > 1 else kv,
                        [o], [first + i], kv_capacity(o + 1))
        self.offsets += cache.offsets

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (ascending), renumbered from 0; buckets that lose no row are not copied."""
        new_index = {r: i for i, r in enumerate(rows)}
        index = mx.array(rows)
        for layer in self.layers:
            if isinstance(layer, LinearLayer):
                layer.conv, layer.state = layer.conv[index], layer.state[index]
        buckets = []
        for b in self.buckets:
            stay = [i for i, r in enumerate(b.rows) if r in new_index]
            if stay and len(stay) < len(b.rows):
                b.kv = [layer.take(mx.array(stay), layer.keys.shape[2]) for layer in b.kv]
            if stay:
                b.rows = [new_index[b.rows[i]] for i in stay]
                buckets.append(b)
        self.buckets = buckets
        self.offsets = [self.offsets[r] for r in rows]

    def fit(self, T: int) -> None:
        """Before a forward of T tokens: move each row whose bucket cannot hold T more into the bucket
        for its new length (copying only the buckets it leaves and enters)."""
        for b in list(self.buckets):
            moving = [i for i, r in enumerate(b.rows) if self.offsets[r] + T > b.capacity]
            if not moving:
                continue
            stay = [i for i in range(len(b.rows)) if i not in moving]
            targets: dict[int, list[int]] = {}
            for i in moving:
                targets.setdefault(kv_capacity(self.offsets[b.rows[i]] + T), []).append(i)
            for capacity, idx in targets.items():
                rows = [b.rows[i] for i in idx]
                offsets = [self.offsets[r] for r in rows]
                self._place([layer.take(mx.array(idx), max(offsets)) for layer in b.kv], offsets, rows, capacity)
            if stay:
                b.kv = [layer.take(mx.array(stay), layer.keys.shape[2]) for layer in b.kv]
                b.rows = [b.rows[i] for i in stay]
            else:
                self.buckets.remove(b)

    def rollback(self, kept: list[int], fed: list[int]) -> None:
        _rollback(self, kept, fed)

    def snapshot(self, row: int, kv_from: int = 0) -> Cache:
        """Row `row` as an independent, evaluated batch-1 Cache (KV for [kv_from, offset))."""
        b = next(b for b in self.buckets if row in b.rows)
        pos, offset = mx.array([b.rows.index(row)]), self.offsets[row]
        kv = iter([layer.take(pos, offset, kv_from) for layer in b.kv])
        index = mx.array([row])
        layers = [LinearLayer(layer.conv[index], layer.state[index]) if isinstance(layer, LinearLayer) else next(kv)
                  for layer in self.layers]
        snap = Cache(layers, [offset])
        mx.eval(snap.state())
        return snap
