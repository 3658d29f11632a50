"""The prefix cache's arrays: a KV segment (one run of positions, every full-attention layer), a
state (conv + recurrent, every linear-attention layer), and the batch-1 `Cache` assembled from a
path's segments and the state at its end. The exchange format with the runner is model.cache's
KVLayer / LinearLayer / Cache."""

from __future__ import annotations

import mlx.core as mx

from model.cache import KV_STEP, Cache, KVLayer, LinearLayer


class KVSegment:
    """KV of `length` consecutive positions: layers[i] = (keys, values), each [1, Hkv, length, D],
    for the i-th full-attention layer. The arrays own their buffers (evaluated copies)."""

    def __init__(self, layers: list[tuple[mx.array, mx.array]], length: int):
        self.layers, self.length = layers, length

    def __len__(self) -> int:
        return self.length

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def split(self, n: int) -> tuple["KVSegment", "KVSegment"]:
        """Positions [0, n) and [n, length), each a copy: a slice would keep this whole buffer alive."""
        head, tail = _take(self.layers, 0, n), _take(self.layers, n, self.length)
        mx.eval([a for kv in head + tail for a in kv])
        return KVSegment(head, n), KVSegment(tail, self.length - n)

    def slice(self, start: int, end: int) -> "KVSegment":
        """Positions [start, end), copied."""
        layers = _take(self.layers, start, end)
        mx.eval(layers)
        return KVSegment(layers, end - start)


class State:
    """Conv and recurrent state per linear-attention layer, at one point of a sequence."""

    def __init__(self, layers: list[LinearLayer]):
        self.layers = layers

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.layers for a in layer.arrays())


def _take(layers, start: int, end: int):
    # a gather copies exactly [1, H, end - start, D]
    index = mx.arange(start, end)
    return [(mx.take(k, index, axis=2), mx.take(v, index, axis=2)) for k, v in layers]


def from_snapshot(snapshot: Cache, kv_from: int) -> tuple[KVSegment, State]:
    """Split an evaluated batch-1 snapshot whose KV holds positions [kv_from, offset)."""
    kv = [(layer.keys, layer.values) for layer in snapshot.layers if isinstance(layer, KVLayer)]
    state = State([layer for layer in snapshot.layers if isinstance(layer, LinearLayer)])
    return KVSegment(kv, snapshot.offsets[0] - kv_from), state


def join(segments: list[KVSegment]) -> list[tuple[mx.array, mx.array]]:
    """The segments' KV concatenated along the sequence axis, per full-attention layer."""
    if len(segments) == 1:
        return segments[0].layers
    return [(mx.concatenate([s.layers[i][0] for s in segments], axis=2),
             mx.concatenate([s.layers[i][1] for s in segments], axis=2))
            for i in range(len(segments[0].layers))]


def kv_range(segments: list[KVSegment], start: int, end: int) -> list[tuple[mx.array, mx.array]]:
    """The KV of positions [start, end) of the path the segments make up, per full-attention layer."""
    parts, pos = [], 0
    for segment in segments:
        lo, hi = max(start, pos), min(end, pos + len(segment))
        if lo < hi:
            whole = (lo, hi) == (pos, pos + len(segment))
            parts.append(segment if whole else KVSegment(_take(segment.layers, lo - pos, hi - pos), hi - lo))
        pos += len(segment)
    return join(parts)


def assemble(layer_types: list[str], segments: list[KVSegment], state: State, depth: int) -> Cache:
    """A batch-1 cache at `depth`: the path's KV (with spare capacity up to the next KV_STEP, so
    the first forward after the restore does not copy it again to grow) and the state there."""
    spare = -(-(depth + 1) // KV_STEP) * KV_STEP - depth
    kv = iter(join([*segments, _zeros_like(segments[0], spare)]))
    linear = iter(state.layers)
    layers = [KVLayer(*next(kv)) if t == "full_attention" else next(linear) for t in layer_types]
    return Cache(layers, [depth])


def _zeros_like(segment: KVSegment, length: int) -> KVSegment:
    layers = []
    for k, v in segment.layers:
        shape = (1, k.shape[1], length, k.shape[3])
        layers.append((mx.zeros(shape, k.dtype), mx.zeros(shape, v.dtype)))
    return KVSegment(layers, length)
