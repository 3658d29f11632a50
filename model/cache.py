"""Per-sequence model state with a batch dimension: KV for full attention, conv + recurrent state
for GatedDeltaNet. Rows may hold sequences of different lengths (`offsets`)."""

from __future__ import annotations

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
