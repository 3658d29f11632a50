"""Lazily read tensors: shape plus a reader of leading-axis rows, so nothing is loaded whole.

Readers return MLX arrays in the file's float type (BF16 stays bfloat16: a cast to bfloat16 output is
then free; quantised types come back as float32). Transforms wrap a LazyTensor in another one, which
keeps the inverse of a layout change (row or column permutation, split, reshape) a small pure function.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np

Index = slice | np.ndarray


@dataclass(frozen=True)
class LazyTensor:
    shape: tuple[int, ...]
    take: Callable[[Index], mx.array]  # leading-axis selection -> [n, *shape[1:]]
    source_dtype: str  # "BF16", "F32", "Q4_K", ... (what the file holds)
    source_nbytes: int
    release: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def rows(self, start: int, stop: int) -> mx.array:
        return self.take(slice(start, stop))

    def read(self) -> mx.array:
        return self.take(slice(None))

    def with_take(self, take: Callable[[Index], mx.array], shape: tuple[int, ...] | None = None) -> LazyTensor:
        return replace(self, take=take, shape=tuple(shape) if shape is not None else self.shape)


def _as_indices(index: Index, n: int) -> np.ndarray:
    return np.arange(n)[index] if isinstance(index, slice) else np.asarray(index)


def permute_rows(t: LazyTensor, perm: np.ndarray) -> LazyTensor:
    """out[i] = t[perm[i]] along the leading axis."""
    perm = np.asarray(perm)
    n = t.shape[0]
    return t.with_take(lambda index: t.take(perm[_as_indices(index, n)]))


def permute_cols(t: LazyTensor, perm: np.ndarray) -> LazyTensor:
    """out[..., j] = t[..., perm[j]] along the last axis."""
    perm = mx.array(np.asarray(perm))
    return t.with_take(lambda index: mx.take(t.take(index), perm, axis=-1))


def slice_axis1(t: LazyTensor, start: int, stop: int) -> LazyTensor:
    """t[:, start:stop] (e.g. gate or up out of a fused [E, 2I, H] expert tensor)."""
    shape = (t.shape[0], stop - start, *t.shape[2:])
    return t.with_take(lambda index: t.take(index)[:, start:stop], shape)


def slice_rows(t: LazyTensor, start: int, stop: int) -> LazyTensor:
    """t[start:stop] along the leading axis, as a tensor of its own."""
    n = stop - start

    def take(index):
        return t.take(_as_indices(index, n) + start)

    return t.with_take(take, (n, *t.shape[1:]))


def map_values(t: LazyTensor, fn: Callable[[mx.array], mx.array]) -> LazyTensor:
    return t.with_take(lambda index: fn(t.take(index)))


def reshape(t: LazyTensor, shape: tuple[int, ...]) -> LazyTensor:
    """A reshape that keeps the leading axis, or wraps the whole tensor in new leading axes."""
    shape = tuple(shape)
    if int(np.prod(shape)) != t.numel:
        raise ValueError(f"cannot reshape {t.shape} to {shape}")
    if shape[0] == t.shape[0]:
        return t.with_take(lambda index: t.take(index).reshape(-1, *shape[1:]), shape)

    def take(index):
        whole = t.read().reshape(shape)
        return whole[index] if isinstance(index, slice) else whole[mx.array(index)]

    return t.with_take(take, shape)


def stack(parts: list[LazyTensor]) -> LazyTensor:
    """[E, ...] from E tensors of one shape (per-expert checkpoint tensors)."""
    first = parts[0]
    for p in parts[1:]:
        if p.shape != first.shape:
            raise ValueError(f"cannot stack shapes {first.shape} and {p.shape}")

    def take(index):
        idx = _as_indices(index, len(parts))
        return mx.stack([parts[int(e)].read() for e in idx])

    def release():
        for p in parts:
            p.release()

    return LazyTensor(
        (len(parts), *first.shape), take, first.source_dtype,
        sum(p.source_nbytes for p in parts), release,
    )
