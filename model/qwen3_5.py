"""Qwen3.5 text model (dense and MoE): GatedDeltaNet + gated full attention, in MLX.

Module paths follow mlx-lm's (`language_model.model.layers.N.linear_attn.in_proj_qkv`, experts
under `mlp.switch_mlp`), so per-module `quantization` entries written for mlx-lm apply unchanged.
Norm weights are held with the +1 of the zero-centred RMSNorm already added, as mlx-lm holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, partial

import mlx.core as mx
import mlx.nn as nn

from . import layout
from .cache import BucketedKV, Cache, KVLayer, LinearLayer
from .config import ModelConfig
from .gated_delta import gated_delta, l2norm
from .quantized import Linear
from .switch import SwitchGLU, swiglu


@dataclass
class Batch:
    """What every layer needs to know about the rows of one forward call."""

    offsets: list[int]  # tokens each row had already seen
    lengths: list[int]  # valid new tokens per row (the rest of T is padding)
    T: int
    # a DecodeBatch's per-bucket attention plan, built by the first attention layer for the rest
    buckets: tuple | None = field(default=None, repr=False)
    # a verify forward: GatedDeltaNet layers keep every position's state for a rollback (cache.py)
    keep_states: bool = False
    # the lengths as an array, inside a compiled step (DecoderLayer.step), where `lengths` is only a
    # placeholder: a Python list would be a constant of the trace. Treated as ragged.
    length_array: mx.array | None = field(default=None, repr=False)

    @property
    def ragged(self) -> bool:
        return self.length_array is not None or any(n != self.T for n in self.lengths)

    def lengths_array(self) -> mx.array:
        return self.length_array if self.length_array is not None else mx.array(self.lengths)

    def valid(self) -> mx.array:  # [B, T] bool
        return mx.arange(self.T)[None, :] < self.lengths_array()[:, None]


class RMSNorm(nn.Module):
    """weight holds (1 + w) of the zero-centred norm; computed in float32."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        y = mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps)
        return y.astype(x.dtype)


@partial(mx.compile, shapeless=True)
def _gated_rms_norm(x, z, weight, eps):
    y = mx.fast.rms_norm(x.astype(mx.float32), weight.astype(mx.float32), eps)
    return (y * nn.silu(z.astype(mx.float32))).astype(x.dtype)


@partial(mx.compile, shapeless=True)
def _decay_and_beta(a, b, A_log, dt_bias):
    """log-decay g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), in float32."""
    g = -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + dt_bias.astype(mx.float32))
    return g, mx.sigmoid(b.astype(mx.float32))


@partial(mx.compile, shapeless=True)
def _sigmoid_gate(x, gate):
    return x * mx.sigmoid(gate)


class GatedNorm(nn.Module):
    """w * rmsnorm(x) * silu(z) over each v head (plain weight, not zero-centred)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x, z):
        return _gated_rms_norm(x, z, self.weight, self.eps)


class DepthwiseConv(nn.Module):
    """Causal depthwise conv as K shifted multiply-adds; weight [C, K, 1] as mlx-lm stores it.
    (MLX's grouped conv is slow on the CPU backend; this form is cheap on every backend.)"""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel, 1))

    def __call__(self, window: mx.array) -> mx.array:
        """window [B, K-1+T, C] -> [B, T, C]"""
        K = self.weight.shape[1]
        T = window.shape[1] - K + 1
        w = self.weight[:, :, 0].T.astype(window.dtype)  # [K, C]
        out = window[:, :T] * w[0]
        for k in range(1, K):
            out = out + window[:, k : k + T] * w[k]
        return out


class GatedDeltaNet(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.Hk, self.Hv = c.linear_num_key_heads, c.linear_num_value_heads
        self.Dk, self.Dv = c.linear_key_head_dim, c.linear_value_head_dim
        self.key_dim, self.value_dim = self.Hk * self.Dk, self.Hv * self.Dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = c.linear_conv_kernel_dim
        self.in_proj_qkv = Linear(c.hidden_size, self.conv_dim, bias=False)
        self.in_proj_z = Linear(c.hidden_size, self.value_dim, bias=False)
        self.in_proj_b = Linear(c.hidden_size, self.Hv, bias=False)
        self.in_proj_a = Linear(c.hidden_size, self.Hv, bias=False)
        self.conv1d = DepthwiseConv(self.conv_dim, self.kernel)
        self.dt_bias = mx.ones((self.Hv,))
        self.A_log = mx.zeros((self.Hv,))
        self.norm = GatedNorm(self.Dv, c.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, c.hidden_size, bias=False)

    def empty_state(self, batch: int, dtype) -> LinearLayer:
        return LinearLayer(
            mx.zeros((batch, self.kernel - 1, self.conv_dim), dtype=dtype),
            mx.zeros((batch, self.Hv, self.Dk, self.Dv), dtype=mx.float32),
        )

    def __call__(self, x: mx.array, cache: LinearLayer, batch: Batch) -> mx.array:
        B, T, _ = x.shape
        qkv = self.in_proj_qkv(x)
        z = self.in_proj_z(x).reshape(B, T, self.Hv, self.Dv)
        b = self.in_proj_b(x)
        a = self.in_proj_a(x)

        window = mx.concatenate([cache.conv.astype(qkv.dtype), qkv], axis=1)  # [B, K-1+T, C]
        if batch.ragged:
            # The new conv state is the K-1 inputs ending at each row's last valid token.
            pos = batch.lengths_array()[:, None] + mx.arange(self.kernel - 1)
            cache.conv = mx.take_along_axis(window, pos[..., None], axis=1)
        else:
            # a copy: a slice would keep the whole [B, K-1+T, C] window alive with the cache
            cache.conv = mx.contiguous(window[:, -(self.kernel - 1) :])
        conv = nn.silu(self.conv1d(window))  # [B, T, C]

        q, k, v = mx.split(conv, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = l2norm(q.reshape(B, T, self.Hk, self.Dk)) * self.Dk**-0.5
        k = l2norm(k.reshape(B, T, self.Hk, self.Dk))
        v = v.reshape(B, T, self.Hv, self.Dv).astype(mx.float32)
        r = self.Hv // self.Hk
        if r > 1:  # k head j serves the r consecutive v heads j*r .. j*r+r-1
            q, k = mx.repeat(q, r, axis=2), mx.repeat(k, r, axis=2)

        g, beta = _decay_and_beta(a, b, self.A_log, self.dt_bias)
        if batch.ragged:
            valid = batch.valid()[..., None]
            beta, g = mx.where(valid, beta, 0.0), mx.where(valid, g, 0.0)

        if batch.keep_states:
            o, cache.state, states = gated_delta(q, k, v, g, beta, cache.state, keep_states=True)
            cache.steps = (window, states)
        else:
            o, cache.state = gated_delta(q, k, v, g, beta, cache.state)
        o = self.norm(o.astype(x.dtype), z)
        return self.out_proj(o.reshape(B, T, self.value_dim))


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.head_dim**-0.5
        self.rotary_dims, self.rope_theta = c.rotary_dims, c.rope_theta
        self.q_proj = Linear(c.hidden_size, self.n_heads * self.head_dim * 2, bias=False)
        self.k_proj = Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)

    def empty_state(self, batch: int, dtype) -> KVLayer:
        shape = (batch, self.n_kv, 0, self.head_dim)
        return KVLayer(mx.zeros(shape, dtype=dtype), mx.zeros(shape, dtype=dtype))

    def __call__(self, x: mx.array, cache: KVLayer, batch: Batch, mask) -> mx.array:
        offsets = batch.offsets
        q, k, v, gate = self.project(x, offsets[0] if len(set(offsets)) == 1 else mx.array(offsets))
        return self.finish(self.attend(q, k, v, cache, batch, mask), gate)

    def project(self, x: mx.array, offset) -> tuple[mx.array, ...]:
        """q, k, v [B, heads, T, D] with rope from `offset` (an int, or an array [B] per row), and the
        output gate [B, T, heads * D]."""
        B, T, _ = x.shape
        qg = self.q_proj(x).reshape(B, T, self.n_heads, 2 * self.head_dim)
        q, gate = qg[..., : self.head_dim], qg[..., self.head_dim :]
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, T, self.n_kv, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv, -1).transpose(0, 2, 1, 3)
        rope = dict(dims=self.rotary_dims, traditional=False, base=self.rope_theta, scale=1.0, offset=offset)
        return mx.fast.rope(q, **rope), mx.fast.rope(k, **rope), v, gate.reshape(B, T, -1)

    def attend(self, q, k, v, cache: KVLayer | BucketedKV, batch: Batch, mask) -> mx.array:
        """Writes k, v into the cache; the attention output [B, heads, T, D]."""
        if isinstance(cache, BucketedKV):
            return self._attend_by_bucket(q, k, v, cache, batch)
        keys, values = cache.update(k, v, batch.offsets)
        return mx.fast.scaled_dot_product_attention(q, keys, values, scale=self.scale, mask=mask)

    def finish(self, o: mx.array, gate: mx.array) -> mx.array:
        B, _, T, _ = o.shape
        return self.o_proj(_sigmoid_gate(o.transpose(0, 2, 1, 3).reshape(B, T, -1), gate))

    def _attend_by_bucket(self, q, k, v, cache: BucketedKV, batch: Batch) -> mx.array:
        """Each length bucket of a DecodeBatch attends over its own keys only (a short row never
        attends over a long row's padding); the outputs go back into row order."""
        parts = cache.parts()
        if batch.buckets is None:
            batch.buckets = _bucket_plan([rows for rows, _ in parts], batch)
        plan, inverse = batch.buckets
        outs = []
        for (index, offsets, mask), (_, kv) in zip(plan, parts):
            qb, kb, vb = (q, k, v) if index is None else (q[index], k[index], v[index])
            keys, values = kv.update(kb, vb, offsets)
            outs.append(mx.fast.scaled_dot_product_attention(qb, keys, values, scale=self.scale, mask=mask))
        o = outs[0] if len(outs) == 1 else mx.concatenate(outs)
        return o if inverse is None else o[inverse]


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class SparseMoE(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.top_k = c.num_experts_per_tok
        self.gate = Linear(c.hidden_size, c.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(c.hidden_size, c.moe_intermediate_size, c.num_experts)
        self.shared_expert = MLP(c.hidden_size, c.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(c.hidden_size, 1, bias=False)

    def traceable(self, rows: int) -> bool:
        """Whether `rows` tokens go through this block without reading anything on the host."""
        return not self.switch_mlp.reads_host(rows * self.top_k)

    def __call__(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        # indices have no gradient; without this, training through the layer (the MTP head) fails
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k])
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = (w / mx.sum(w, axis=-1, keepdims=True)).astype(x.dtype)
        y = mx.sum(self.switch_mlp(x, idx) * w[..., None], axis=1)
        y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape)


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, layer_type: str):
        super().__init__()
        self.is_linear = layer_type == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(c)
        else:
            self.self_attn = Attention(c)
        self.mlp = SparseMoE(c) if c.is_moe else MLP(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def __call__(self, x, cache, batch: Batch, mask):
        h = self.input_layernorm(x)
        if self.is_linear:
            h = self.linear_attn(h, cache, batch)
        else:
            h = self.self_attn(h, cache, batch, mask)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))

    def step(self, x: mx.array, cache, batch: Batch, mask, offsets: mx.array) -> mx.array:
        """The same as __call__ for a decode step (T = 1, no padding) or a verify forward (a few
        positions per row, ragged, every GatedDeltaNet position's state kept), with everything but
        the attention core in compiled functions: the core (the cache write and attention over each
        row's keys) changes shape every step, the rest only with [B, T]. MLX then fuses the
        elementwise work into a few kernels and the host builds a handful of graph nodes per layer
        instead of about a hundred. `offsets` [B]: each row's position, as an array so that a new
        position is not a new trace. The weights are constants of the traces (compiled on first
        use, per shape)."""
        if self.is_linear:
            if batch.keep_states:
                x, cache.conv, cache.state, *steps = self._verify_step(x, cache.conv, cache.state,
                                                                        batch.lengths_array())
                cache.steps = tuple(steps)
                return x
            if batch.ragged:
                raise ValueError("a compiled step of a GatedDeltaNet layer takes padding only in a verify forward")
            x, cache.conv, cache.state = self._linear_step(x, cache.conv, cache.state)
            return x
        q, k, v, gate = self._attention_in(x, offsets)
        return self._attention_out(x, self.self_attn.attend(q, k, v, cache, batch, mask), gate)

    # the compiled forms, made on first use (a plain attribute: not a module child, not a parameter)
    @cached_property
    def _linear_step(self):
        return mx.compile(self._linear_body)

    @cached_property
    def _verify_step(self):
        return mx.compile(self._verify_body)

    @cached_property
    def _attention_in(self):
        return mx.compile(lambda x, offsets: self.self_attn.project(self.input_layernorm(x), offsets))

    @cached_property
    def _attention_out(self):
        return mx.compile(self._attention_out_body)

    def traceable(self, rows: int) -> bool:
        """Whether a forward of `rows` tokens can run as `step` (nothing read on the host)."""
        return not isinstance(self.mlp, SparseMoE) or self.mlp.traceable(rows)

    def _linear_body(self, x, conv, state):
        B = x.shape[0]
        cache = LinearLayer(conv, state)
        x = self(x, cache, Batch([0] * B, [1] * B, 1), None)
        return x, cache.conv, cache.state

    def _verify_body(self, x, conv, state, lengths):
        B, T = x.shape[:2]
        cache = LinearLayer(conv, state)
        x = self(x, cache, Batch([0] * B, [T] * B, T, keep_states=True, length_array=lengths), None)
        return (x, cache.conv, cache.state, *cache.steps)

    def _attention_out_body(self, x, o, gate):
        x = x + self.self_attn.finish(o, gate)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = [DecoderLayer(c, t) for t in c.layer_types]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class LanguageModel(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.model = TextModel(c)
        if not c.tie_word_embeddings:
            self.lm_head = Linear(c.hidden_size, c.vocab_size, bias=False)


def forward_rows(model, tokens: mx.array, cache, lengths, keep_states: bool = False):
    """Checks a forward's arguments; returns the cache to use (a new one when None) and the Batch."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape [batch, time], got {tokens.shape}")
    B, T = tokens.shape
    if cache is None:
        cache = model.make_cache(B)
    if cache.batch_size != B:
        raise ValueError(f"cache holds {cache.batch_size} rows but tokens has {B}")
    lengths = [T] * B if lengths is None else [int(n) for n in lengths]
    if len(lengths) != B or any(not 0 <= n <= T for n in lengths):
        raise ValueError(f"lengths must give 0..{T} for each of {B} rows, got {lengths}")
    return cache, Batch(list(cache.offsets), lengths, T, keep_states=keep_states)


def _attention_mask(batch: Batch):
    """Causal mask over [cached + new] keys; row b's query i sees keys j <= offsets[b] + i."""
    return _causal_mask(batch.offsets, batch.T)


def _bucket_plan(groups: list[list[int]], batch: Batch) -> tuple:
    """Per bucket (its rows as an index, None when one bucket holds every row in order; their
    offsets; their mask), and the index that puts the buckets' outputs back into row order."""
    order = [r for rows in groups for r in rows]
    whole = len(groups) == 1 and order == list(range(len(order)))
    plan = []
    for rows in groups:
        offsets = [batch.offsets[r] for r in rows]
        plan.append((None if whole else mx.array(rows), offsets, _causal_mask(offsets, batch.T)))
    in_order = order == list(range(len(order)))
    return plan, None if in_order else mx.array(sorted(range(len(order)), key=order.__getitem__))


def _causal_mask(offsets: list[int], T: int):
    if len(set(offsets)) == 1:  # keys end exactly where the queries end
        return None if T == 1 else "causal"
    S = max(offsets) + T
    q_pos = mx.array(offsets)[:, None] + mx.arange(T)  # [B, T]
    return (mx.arange(S)[None, None, :] <= q_pos[..., None])[:, None]  # [B, 1, T, S]


# Verify forwards up to this many positions per row run compiled (one trace per [B, T]).
MAX_VERIFY = 8


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config)
        if config.mtp_num_hidden_layers:
            from .mtp import MTP  # mtp.py builds on this module's layers

            self.mtp = MTP(config)
        self.compute_dtype = mx.float32
        # decode steps run the layers' compiled forms (DecoderLayer.step); off where a layer's
        # forward holds a collective that must not be traced (model/parallel.py's tensor split)
        self.compiled_step = True

    @property
    def layers(self) -> list[DecoderLayer]:
        return self.language_model.model.layers

    def make_cache(self, batch_size: int = 1) -> Cache:
        layers = []
        for layer in self.layers:
            mixer = layer.linear_attn if layer.is_linear else layer.self_attn
            layers.append(mixer.empty_state(batch_size, self.compute_dtype))
        return Cache(layers, [0] * batch_size)

    def make_mtp_cache(self, batch_size: int = 1) -> Cache:
        """The MTP head's own KV cache (one KVLayer per MTP layer)."""
        return self.mtp.make_cache(batch_size, self.compute_dtype)

    def logits(self, x: mx.array) -> mx.array:
        """The vocabulary projection of final-normed hidden states: lm_head, or the tied embedding."""
        lm = self.language_model
        return lm.model.embed_tokens.as_linear(x) if self.config.tie_word_embeddings else lm.lm_head(x)

    def draft(self, hidden: mx.array, next_tokens: mx.array, cache: Cache, lengths=None):
        """The MTP head with this model's embedding and lm_head: see `mtp.MTP.__call__`."""
        return self.mtp(hidden, next_tokens, cache, self.language_model.model.embed_tokens, self.logits, lengths)

    def __call__(self, tokens: mx.array, cache: Cache | None = None, lengths=None,
                 last_only: bool = False, return_hidden: bool = False, keep_states: bool = False):
        """tokens [B, T] -> logits [B, T, vocab]. With `lengths`, row b's valid tokens are its
        first lengths[b] (the rest is padding whose logits are meaningless). `cache` is advanced
        by each row's length. `last_only` returns [B, 1, vocab] at each row's last valid token,
        skipping the vocabulary projection everywhere else. `return_hidden` returns
        (logits, the final-normed hidden state [B, T, H] at every position, last_only or not), what
        the MTP head reads. `keep_states` keeps each GatedDeltaNet position's state for
        `cache.rollback` (a speculative verify forward)."""
        cache, batch = forward_rows(self, tokens, cache, lengths, keep_states)
        lengths = batch.lengths
        mask = _attention_mask(batch)
        lm = self.language_model
        x = lm.model.embed_tokens(tokens).astype(self.compute_dtype)
        if (self.compiled_step and self.layers[0].traceable(tokens.size)
                and ((batch.T == 1 and not batch.ragged) or (keep_states and batch.T <= MAX_VERIFY and not last_only))):
            return self._step(x, cache, batch, mask, return_hidden)
        for layer, state in zip(lm.model.layers, cache.layers):
            x = layer(x, state, batch, mask)
        hidden = lm.model.norm(x) if return_hidden else None
        if last_only:
            last = mx.array([max(n, 1) - 1 for n in lengths])
            x = mx.take_along_axis(x, last[:, None, None], axis=1)
        x = lm.model.norm(x) if hidden is None or last_only else hidden
        cache.offsets = [o + n for o, n in zip(cache.offsets, lengths)]
        logits = self.logits(x)
        return (logits, hidden) if return_hidden else logits

    def _step(self, x, cache, batch: Batch, mask, return_hidden: bool):
        """A decode step or a verify forward through the layers' compiled forms (DecoderLayer.step)
        and a compiled final norm + vocabulary projection (at every position)."""
        offsets = mx.array(batch.offsets)
        for layer, state in zip(self.layers, cache.layers):
            x = layer.step(x, state, batch, mask, offsets)
        logits, hidden = self._final(x)
        cache.offsets = [o + n for o, n in zip(cache.offsets, batch.lengths)]
        return (logits, hidden) if return_hidden else logits

    @cached_property
    def _final(self):
        """Compiled: the final norm and the vocabulary projection -> (logits, normed hidden state)."""
        def final(x):
            hidden = self.language_model.model.norm(x)
            return self.logits(hidden), hidden

        return mx.compile(final)


_FLOAT32_PARAMS = ("A_log", "dt_bias", "norm.weight", "layernorm.weight")
_APPLY = {  # layout.OPS on MLX arrays
    "take": lambda xs: xs[0],
    "stack": mx.stack,
    "gate_half": lambda xs: xs[0][:, : xs[0].shape[1] // 2],
    "up_half": lambda xs: xs[0][:, xs[0].shape[1] // 2 :],
    "conv": lambda xs: xs[0].swapaxes(1, 2),
    "plus_one": lambda xs: xs[0].astype(mx.float32) + 1.0,
}


def sanitize(weights: dict, config: ModelConfig) -> tuple[dict, dict]:
    """Map a checkpoint in any layout `layout` accepts to this module tree; the output is unchanged
    by a second run. Returns (weights, sources): sources[new_key] lists the checkpoint keys it came from."""
    steps = layout.plan({k: v.shape for k, v in weights.items()}, config.tie_word_embeddings,
                        keep_mtp=config.mtp_num_hidden_layers > 0)
    out = {name: _APPLY[step.op]([weights[k] for k in step.sources]) for name, step in steps.items()}
    return out, {name: list(step.sources) for name, step in steps.items()}


def keeps_float32(key: str) -> bool:
    """Small parameters held in float32 whatever the compute dtype (decay, gates, norms)."""
    return key.endswith(_FLOAT32_PARAMS)
