"""What the output holds: one Item per source tensor (its quantisation, scaling and output tensors),
grouped into shards. Deterministic, so a resumed run writes the same bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .recipes import QuantSpec, Recipe
from .tensor import LazyTensor

ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
ST_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "U32": 4}


@dataclass(frozen=True)
class OutTensor:
    key: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * ST_SIZES[self.dtype]


@dataclass
class Item:
    name: str  # our parameter name (…weight, A_log, …)
    tensor: LazyTensor
    dtype: str  # float dtype written (the weights, or the scales and biases)
    spec: QuantSpec | None = None
    importance: np.ndarray | None = None  # error weights for the scale search, [in] or [E, in]
    search: bool = False  # search each group's scale and bias (else mx.quantize's min/max)

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    @property
    def outputs(self) -> list[OutTensor]:
        shape = self.tensor.shape
        if self.spec is None:
            return [OutTensor(self.name, ST_DTYPES[self.dtype], shape)]
        lead, n_in = shape[:-1], shape[-1]
        groups = (*lead, n_in // self.spec.group_size)
        st = ST_DTYPES[self.dtype]
        return [OutTensor(self.name, "U32", (*lead, n_in * self.spec.bits // 32)),
                OutTensor(f"{self.module}.scales", st, groups),
                OutTensor(f"{self.module}.biases", st, groups)]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.outputs)


def quantisable(name: str, shape: tuple[int, ...]) -> bool:
    """Linear, expert-stack and embedding weights; never norms, conv1d, A_log, dt_bias."""
    return name.endswith(".weight") and len(shape) in (2, 3) and ".conv1d." not in name


def float_dtype(shape: tuple[int, ...], dtype: str) -> str:
    """1-D parameters (norms, A_log, dt_bias) stay float32: tiny, and 1 + w keeps its precision."""
    return "float32" if len(shape) == 1 else dtype


def plan_items(tensors: dict[str, LazyTensor], dtype: str, recipe: Recipe | None, q_bits: int,
               q_group_size: int) -> list[Item]:
    items = []
    for name, t in tensors.items():
        spec = None
        if recipe is not None and quantisable(name, t.shape):
            spec = recipe.spec(name.removesuffix(".weight"), t.shape, q_bits, q_group_size)
        items.append(Item(name, t, float_dtype(t.shape, dtype), spec))
    return items


def assign_shards(items: list[Item], shard_size: int) -> list[list[Item]]:
    shards: list[list[Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def quantization_config(items: list[Item], q_bits: int, q_group_size: int) -> dict | None:
    """config.json's `quantization`: defaults plus one entry per module that differs."""
    if not any(i.spec is not None for i in items):
        return None
    q = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
    for i in items:
        if i.spec is not None and (i.spec.bits, i.spec.group_size) != (q_bits, q_group_size):
            q[i.module] = {"group_size": i.spec.group_size, "bits": i.spec.bits, "mode": "affine"}
    return q
