"""Qwen3.5's multi-token-prediction (MTP) head: drafts the token after next from the trunk's state.

Where each formula comes from (transformers drops `mtp.*`, so it is no reference; REFERENCE.md
section 10): vLLM `qwen3_next_mtp.py` / `qwen3_5_mtp.py`, SGLang `qwen3_5_mtp.py` and llama.cpp
`qwen35moe.cpp` (graph_mtp) agree that, at position t,

    x = fc(concat[pre_fc_norm_embedding(embed(token t+1)), pre_fc_norm_hidden(h_t)])   (embedding first)
    x = DecoderLayer_full_attention(x)  (the model's own MLP: MoE + shared expert on MoE models)
    h' = norm(x);  logits = lm_head(h')

with h_t the trunk's hidden state after its final norm, every norm zero-centred ((1 + w), held with
the +1 like the trunk's), rope position t, and a KV cache of its own. The k-th chained draft feeds h'
and its own drafted token back in at the next position.

Parameters sit under `mtp.` beside `language_model.` (mlx-lm's module tree; mlx-lm drops `mtp.*`
when it loads, so our shards stay loadable there).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import mlx.core as mx
import mlx.nn as nn

from .cache import Cache
from .config import ModelConfig
from .qwen3_5 import MAX_VERIFY, Batch, DecoderLayer, RMSNorm, _attention_mask
from .quantized import Linear


class MTP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        if c.mtp_num_hidden_layers < 1:
            raise ValueError("MTP needs mtp_num_hidden_layers >= 1")
        self.fc = Linear(2 * c.hidden_size, c.hidden_size, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_fc_norm_hidden = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layers = [DecoderLayer(c, "full_attention") for _ in range(c.mtp_num_hidden_layers)]
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def make_cache(self, batch_size: int, dtype) -> Cache:
        return Cache([layer.self_attn.empty_state(batch_size, dtype) for layer in self.layers], [0] * batch_size)

    def __call__(self, hidden: mx.array, next_tokens: mx.array, cache: Cache,
                 embed: Callable[[mx.array], mx.array], lm_head: Callable[[mx.array], mx.array],
                 lengths=None) -> tuple[mx.array, mx.array]:
        """hidden [B, T, H] (the trunk's final-normed state, or this head's own `hidden_out`) and
        next_tokens [B, T] (the token after each of those positions) -> (logits [B, T, V] for the
        token after next, hidden_out [B, T, H]). `cache` is advanced by each row's length."""
        B, T = next_tokens.shape
        if hidden.shape[:2] != (B, T):
            raise ValueError(f"hidden {hidden.shape} and next_tokens {next_tokens.shape} disagree on [B, T]")
        if cache.batch_size != B:
            raise ValueError(f"the MTP cache holds {cache.batch_size} rows but next_tokens has {B}")
        lengths = [T] * B if lengths is None else [int(n) for n in lengths]
        # Drafting steps (a few positions) run compiled, one trace per [B, T]; prompt chunks, whose
        # lengths vary, do not.
        compiled = T <= MAX_VERIFY
        x = (self._input if compiled else self._input_body)(embed(next_tokens).astype(hidden.dtype), hidden)
        batch = Batch(list(cache.offsets), lengths, T)
        mask = _attention_mask(batch)
        offsets = mx.array(batch.offsets)
        for layer, state in zip(self.layers, cache.layers):
            # full attention only: its compiled form takes any [B, T] (padding needs no masking
            # there: a padded position's KV lies past the row's offset, masked until overwritten)
            if compiled and layer.traceable(B * T):
                x = layer.step(x, state, batch, mask, offsets)
            else:
                x = layer(x, state, batch, mask)
        cache.offsets = [o + n for o, n in zip(cache.offsets, lengths)]
        x = self.norm(x)
        return lm_head(x), x

    @cached_property
    def _input(self):  # compiled on first use (a plain attribute: not a module child)
        return mx.compile(self._input_body)

    def _input_body(self, embedded, hidden):
        e, h = self.pre_fc_norm_embedding(embedded), self.pre_fc_norm_hidden(hidden)
        return self.fc(mx.concatenate([e, h], axis=-1))
