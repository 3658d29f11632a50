"""One Qwen3.5 model across the ranks of an mx.distributed group (started by `mlx.launch`).

`load_distributed(path, mode, group)` is called by every rank with the same arguments and returns what
the engine runs unchanged: `model(tokens, cache, lengths, last_only)` gives identical logits on every
rank (so all ranks sample the same tokens in lockstep), and `make_cache` holds only this rank's state.

- "pipeline": rank r holds a run of consecutive layers, in proportion to the ranks' memory; rank 0
  also holds the embedding. Activations go rank r -> r + 1 (ring neighbours), and the last stage's
  final hidden state reaches every rank through one all_gather of [B, T, hidden]. Every rank holds the
  final norm and lm_head (the embedding, when tied) and computes the logits itself: that costs
  vocab x hidden weights per rank, and saves sending vocab-wide logits (60x the hidden size for the
  397B) on every step.
- "tensor": every layer on every rank, each with 1/N of the attention heads (q, gate, k, v by head,
  o_proj by its input columns), of the GatedDeltaNet head groups (q/k/v conv channels, z, a, b,
  A_log, dt_bias; out_proj by columns), and of every MLP's and expert's intermediate dimension; an
  all_sum closes each attention block and each MLP / MoE block (2 per layer). Embedding, norms,
  routers and lm_head are replicated.

Only this rank's tensors are read from disk: MLX loads safetensors lazily, so tensors never
evaluated are never read, and a tensor-parallel slice is copied out before its tensor is released.
The multi-token-prediction head is not loaded (no drafting across ranks).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .cache import Cache
from .config import ModelConfig
from .loader import load_model
from .qwen3_5 import MLP, Attention, GatedDeltaNet, Model, SparseMoE, _attention_mask, forward_rows

MODES = ("pipeline", "tensor")
_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")


def load_distributed(path, mode: str, group: mx.distributed.Group, *, memory: list[int] | None = None,
                     **load_kwargs):
    """This rank's part of the model at `path` (see the module docstring). `memory` overrides each
    rank's memory size for the pipeline split (default: gathered from the ranks' devices).
    ValueError names what makes the split impossible; `load_kwargs` go to loader.load_model."""
    if mode not in MODES:
        raise ValueError(f"distributed mode must be one of {', '.join(MODES)}, got {mode!r}")
    config = ModelConfig.from_file(Path(path) / "config.json")
    n, rank = group.size(), group.rank()
    if mode == "pipeline":
        if memory is None:
            memory = gather_memory(group)
        if len(memory) != n:
            raise ValueError(f"memory gives {len(memory)} ranks' sizes; the group has {n} ranks")
        bounds = split_layers(config.num_hidden_layers, memory)
        start, end = bounds[rank], bounds[rank + 1]
        model = load_model(path, mtp=False, prepare=partial(_keep_stage, start=start, end=end, first=rank == 0),
                           **load_kwargs)
        return PipelineModel(model, group, start, end)
    problems = tensor_split_problems(config, n)
    if problems:
        raise ValueError(f"tensor parallel over {n} ranks is impossible: " + "; ".join(problems))
    return load_model(path, mtp=False, prepare=partial(_shard, group=group), **load_kwargs)


# ---- pipeline ----

def gather_memory(group: mx.distributed.Group) -> list[int]:
    """Each rank's memory size in MiB (the device's, else the machine's RAM on the CPU backend)."""
    size = mx.device_info().get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    sizes = mx.distributed.all_gather(mx.array([size >> 20], dtype=mx.int32), group=group)
    return [int(s) for s in sizes.tolist()]


def split_layers(n_layers: int, memory: list[int]) -> list[int]:
    """Stage boundaries [0, b1, ..., n_layers]: rank r runs layers bounds[r]:bounds[r + 1], a share
    proportional to memory[r], at least one layer each."""
    n = len(memory)
    if n > n_layers:
        raise ValueError(f"pipeline over {n} ranks needs at least {n} layers; the model has {n_layers}")
    if any(m <= 0 for m in memory):
        raise ValueError(f"every rank's memory must be positive, got {memory}")
    total, cum, bounds = sum(memory), 0, [0]
    for r, m in enumerate(memory[:-1]):
        cum += m
        b = round(n_layers * cum / total)
        bounds.append(min(max(b, bounds[-1] + 1), n_layers - (n - 1 - r)))
    return bounds + [n_layers]


def _keep_stage(model: Model, weights: dict, *, start: int, end: int, first: bool) -> dict:
    """loader prepare hook: drop the other stages' layers (and the embedding after the first stage,
    unless it is also the tied lm_head) from `model`, and their tensors from `weights`."""
    layers = model.language_model.model.layers
    for i in range(len(layers)):
        if not start <= i < end:
            layers[i] = nn.Module()  # keeps the list's indices = checkpoint layer numbers
    drop_embed = not first and not model.config.tie_word_embeddings
    if drop_embed:
        model.language_model.model.pop("embed_tokens")

    def keep(key):
        m = _LAYER.match(key)
        if m:
            return start <= int(m[1]) < end
        return not (drop_embed and key.startswith("language_model.model.embed_tokens."))

    return {k: v for k, v in weights.items() if keep(k)}


class PipelineModel(nn.Module):
    """One pipeline stage; called like Model by every rank with the same tokens."""

    def __init__(self, model: Model, group: mx.distributed.Group, start: int, end: int):
        super().__init__()
        self.model = model
        self.config = model.config
        self.compute_dtype = model.compute_dtype
        self.group, self.start, self.end = group, start, end
        self.rank, self.size = group.rank(), group.size()

    @property
    def layers(self):
        return self.model.language_model.model.layers[self.start:self.end]

    def make_cache(self, batch_size: int = 1) -> Cache:
        states = [(layer.linear_attn if layer.is_linear else layer.self_attn).empty_state(batch_size, self.compute_dtype)
                  for layer in self.layers]
        return Cache(states, [0] * batch_size)

    def __call__(self, tokens: mx.array, cache: Cache | None = None, lengths=None, last_only: bool = False):
        cache, batch = forward_rows(self, tokens, cache, lengths)
        (B, T), lengths = tokens.shape, batch.lengths
        mask = _attention_mask(batch)
        lm = self.model.language_model
        if self.rank == 0:
            x = lm.model.embed_tokens(tokens).astype(self.compute_dtype)
        else:
            x = mx.distributed.recv((B, T, self.config.hidden_size), self.compute_dtype, self.rank - 1,
                                    group=self.group)
        for layer, state in zip(self.layers, cache.layers):
            x = layer(x, state, batch, mask)
        if self.rank < self.size - 1:
            x = mx.distributed.send(x, self.rank + 1, group=self.group)
        if last_only:
            last = mx.array([max(n, 1) - 1 for n in lengths])
            x = mx.take_along_axis(x, last[:, None, None], axis=1)
        x = mx.distributed.all_gather(x, group=self.group)[-B:]  # the last stage's rows
        # send/recv are lazy and each rank's graph differs, so a rank evaluating (say) its cache state
        # before its logits would run its exchanges in another order than its neighbour: deadlock.
        # Scheduling the exchange now runs every rank's exchanges in call order.
        mx.async_eval(x)
        x = lm.model.norm(x)
        cache.offsets = [o + n for o, n in zip(cache.offsets, lengths)]
        return self.model.logits(x)


# ---- tensor ----

def tensor_split_problems(config: ModelConfig, n: int) -> list[str]:
    """What keeps `config` from splitting over n ranks by heads and intermediate dimensions."""
    sizes = {"num_key_value_heads": config.num_key_value_heads,
             "linear_num_key_heads": config.linear_num_key_heads}
    if config.is_moe:
        sizes["moe_intermediate_size"] = config.moe_intermediate_size
        sizes["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size
    else:
        sizes["intermediate_size"] = config.intermediate_size
    return [f"{name} ({size}) is not divisible by {n}" for name, size in sizes.items() if size % n]


def _shard_config(c: ModelConfig, n: int) -> ModelConfig:
    """The sizes of one rank's slice of every layer."""
    return replace(c, num_attention_heads=c.num_attention_heads // n, num_key_value_heads=c.num_key_value_heads // n,
                   linear_num_key_heads=c.linear_num_key_heads // n,
                   linear_num_value_heads=c.linear_num_value_heads // n,
                   intermediate_size=c.intermediate_size // n, moe_intermediate_size=c.moe_intermediate_size // n,
                   shared_expert_intermediate_size=c.shared_expert_intermediate_size // n)


class _SummedMixer:
    """A mixer built at one rank's share of the heads whose output projection's partial sums are
    added across ranks."""

    def __init__(self, c: ModelConfig, group: mx.distributed.Group):
        super().__init__(c)
        self.group = group

    def __call__(self, *args):
        return mx.distributed.all_sum(super().__call__(*args), group=self.group)


class ShardedAttention(_SummedMixer, Attention):
    pass


class ShardedGatedDeltaNet(_SummedMixer, GatedDeltaNet):
    pass


def _closing_sum(y: mx.array, block) -> mx.array:
    y = mx.distributed.all_sum(y, group=block.group)
    if block.last:
        # The forward's last collective, scheduled now: every rank then runs its collectives in call
        # order, whatever it evaluates first afterwards (rank 0's sampling differs from the others').
        mx.async_eval(y)
    return y


class ShardedMLP(MLP):
    def __init__(self, hidden: int, intermediate: int, group: mx.distributed.Group):
        super().__init__(hidden, intermediate)
        self.group, self.last = group, False

    def __call__(self, x):
        return _closing_sum(super().__call__(x), self)


class ShardedMoE(SparseMoE):
    """Routed and shared experts each hold a slice of their intermediate dimension: the block's
    output is linear in those slices' partial outputs, so one all_sum closes both."""

    def __init__(self, c: ModelConfig, group: mx.distributed.Group):
        super().__init__(c)
        self.group, self.last = group, False

    def __call__(self, x):
        return _closing_sum(super().__call__(x), self)


# How each tensor of a layer is split, by its module path inside the layer: ("out" | "in", segments).
# "out" splits the output rows (axis -2 of a weight [.., out, in], its scales and biases; axis 0 of a
# vector or conv weight), "in" the input columns (axis -1). `segments` names parts concatenated along
# the axis that are split one by one: GatedDeltaNet's q, k and v channels.
_QKV = "qkv"
_SPLITS = {
    "self_attn.q_proj": ("out", None),  # [heads * (q, gate)], head-major: whole heads stay together
    "self_attn.k_proj": ("out", None),
    "self_attn.v_proj": ("out", None),
    "self_attn.o_proj": ("in", None),
    "linear_attn.in_proj_qkv": ("out", _QKV),
    "linear_attn.conv1d": ("out", _QKV),
    "linear_attn.in_proj_z": ("out", None),
    "linear_attn.in_proj_a": ("out", None),
    "linear_attn.in_proj_b": ("out", None),
    "linear_attn.A_log": ("out", None),
    "linear_attn.dt_bias": ("out", None),
    "linear_attn.out_proj": ("in", None),
    "mlp.gate_proj": ("out", None),
    "mlp.up_proj": ("out", None),
    "mlp.down_proj": ("in", None),
    "mlp.shared_expert.gate_proj": ("out", None),
    "mlp.shared_expert.up_proj": ("out", None),
    "mlp.shared_expert.down_proj": ("in", None),
    "mlp.switch_mlp.gate_proj": ("out", None),
    "mlp.switch_mlp.up_proj": ("out", None),
    "mlp.switch_mlp.down_proj": ("in", None),
}


def _slice(key: str, x: mx.array, how: tuple, n: int, rank: int, config: ModelConfig) -> mx.array:
    side, segments = how
    if side == "in":
        axis = x.ndim - 1
        if key.endswith(".scales") and x.shape[-1] % n:  # a quantised weight splits into whole groups only
            raise ValueError(
                f"tensor parallel over {n} ranks is impossible: {key.removesuffix('.scales')} has {x.shape[-1]} "
                f"quantization groups along its input, which do not split into {n} whole parts (quantize "
                f"with a smaller group size, or use the pipeline split)")
    else:
        axis = 0 if x.ndim == 1 or key.endswith("conv1d.weight") else x.ndim - 2
    if segments == _QKV:
        kd = config.linear_num_key_heads * config.linear_key_head_dim
        sizes = [kd, kd, config.linear_num_value_heads * config.linear_value_head_dim]
    else:
        sizes = [x.shape[axis]]
    parts, at = [], 0
    for size in sizes:
        step = size // n
        index = [slice(None)] * x.ndim
        index[axis] = slice(at + rank * step, at + (rank + 1) * step)
        parts.append(x[tuple(index)])
        at += size
    # a copy: a slice is a view that would keep the whole loaded tensor alive
    return mx.contiguous(parts[0]) if len(parts) == 1 else mx.concatenate(parts, axis=axis)


def _shard(model: Model, weights: dict, *, group: mx.distributed.Group) -> dict:
    """loader prepare hook: give every layer its sharded modules and slice the tensors to match."""
    c, n, rank = model.config, group.size(), group.rank()
    shard = _shard_config(c, n)
    model.compiled_step = False  # the layers' all_sums (and the last one's async_eval) stay out of traces
    for layer in model.language_model.model.layers:
        if layer.is_linear:
            layer.linear_attn = ShardedGatedDeltaNet(shard, group)
        else:
            layer.self_attn = ShardedAttention(shard, group)
        layer.mlp = ShardedMoE(shard, group) if c.is_moe else ShardedMLP(c.hidden_size, shard.intermediate_size, group)
    layer.mlp.last = True
    out = {}
    for key in list(weights):
        m = _LAYER.match(key)
        module = m and m[2].rsplit(".", 1)[0]
        how = _SPLITS.get(module) or (m and _SPLITS.get(m[2]))  # A_log / dt_bias are parameters, not modules
        if how is None:
            out[key] = weights[key]
            continue
        # one whole tensor in memory at a time: read, copy this rank's slice, release
        out[key] = _slice(key, weights.pop(key), how, n, rank, c)
        mx.eval(out[key])
    return out
