"""Owns the model's arrays: the decoding rows' state (a DecodeBatch: KV in length buckets), a
private cache per request still in prefill, and snapshots for the prefix cache. The only engine
module that runs MLX."""

from __future__ import annotations

import mlx.core as mx

from model import Cache, Model
from model.cache import DecodeBatch, KVLayer, LinearLayer


class Runner:
    def __init__(self, model: Model):
        self.model = model
        self.batch: DecodeBatch | None = None
        self.rows: list[str] = []  # request id of each batch row
        self.prefilling: dict[str, Cache] = {}
        # (chosen tokens [B], logits [B, vocab]) of a decode step launched ahead (already fed into the
        # batch cache) whose tokens the engine has not read yet; rows as self.rows
        self.pending: tuple[mx.array, mx.array] | None = None

    # ---- sizes the scheduler budgets with ----
    # Counted from the layers this model instance holds (a pipeline stage holds only its own).
    def kv_bytes_per_token(self) -> int:
        """K and V bytes one token takes; the scheduler rounds tokens up with model.cache.kv_capacity."""
        layers = self.model.make_cache(1).layers
        return sum(2 * layer.keys.itemsize * layer.keys.shape[1] * layer.keys.shape[3]
                   for layer in layers if isinstance(layer, KVLayer))

    def state_bytes_per_seq(self) -> int:
        """Bytes a sequence holds whatever its length: conv and recurrent state, and the logits row
        of a decode step launched ahead (Runner.pending)."""
        layers = self.model.make_cache(1).layers
        logits = self.model.config.vocab_size * self.model.compute_dtype.size + 4  # + the chosen token
        return logits + sum(layer.conv.nbytes + layer.state.nbytes for layer in layers if isinstance(layer, LinearLayer))

    def live_bytes(self) -> int:
        """Bytes the running sequences' state holds: the decode batch, the caches still in
        prefill, the step launched ahead."""
        caches = ([self.batch] if self.batch is not None else []) + list(self.prefilling.values())
        pending = sum(a.nbytes for a in self.pending) if self.pending is not None else 0
        return sum(c.nbytes for c in caches) + pending

    # ---- prefill ----
    def start(self, request_id: str, snapshot: Cache | None) -> None:
        """Begin a request from scratch or from a prefix-cache snapshot (which stays untouched)."""
        self.prefilling[request_id] = Cache.concat([snapshot]) if snapshot is not None else self.model.make_cache(1)

    def prefill(self, chunks: list[tuple[str, list[int]]]) -> list[mx.array | Exception]:
        """Feed prompt chunks [(request id, tokens)]; returns each one's logits after its last token
        [vocab], or the exception its forward raised. Requests that start from nothing run together
        as right-padded batches of similar lengths (a burst of new short prompts is one forward, not
        one each); the others run alone, since batching them would copy the KV they already hold.
        A batch that raises is run again row by row (each from its untouched private cache), so an
        error is charged to the request that caused it."""
        logits: dict[str, mx.array | Exception] = {}
        fresh, alone = [], []
        for c in chunks:
            (fresh if self.prefilling[c[0]].offsets[0] == 0 else alone).append(c)
        groups = []
        for c in sorted(fresh, key=lambda c: len(c[1])):  # grow a group while padding stays under a quarter
            g = groups[-1] if groups else None
            if g and 4 * len(c[1]) * (len(g) + 1) <= 5 * (sum(len(t) for _, t in g) + len(c[1])):
                g.append(c)
            else:
                groups.append([c])
        for group in groups:
            if len(group) == 1:
                alone += group
                continue
            try:
                width = max(len(t) for _, t in group)
                tokens = mx.array([t + [0] * (width - len(t)) for _, t in group])
                cache = self.model.make_cache(len(group))
                out = self.model(tokens, cache, lengths=[len(t) for _, t in group], last_only=True)
                caches = [cache.select([i]) for i in range(len(group))]
            except Exception:
                alone += group
                continue
            for i, (rid, _) in enumerate(group):
                self.prefilling[rid] = caches[i]
                logits[rid] = out[i, -1]
        for rid, t in alone:
            try:
                logits[rid] = self.model(mx.array(t)[None], self.prefilling[rid], last_only=True)[0, -1]
            except Exception as e:
                logits[rid] = e
        # Parts of the new state lie off the logits' path (the conv window's tail): left lazy, each
        # would keep its whole chunk's inputs alive until the request's next forward.
        mx.async_eval([a for rid, _ in chunks if not isinstance(logits[rid], Exception)
                       for a in self.prefilling[rid].state()])
        return [logits[rid] for rid, _ in chunks]

    def snapshot(self, request_id: str, kv_from: int = 0) -> Cache:
        """The request's state as an independent, evaluated batch-1 Cache: recurrent and conv state
        copied, KV only for positions [kv_from, offset) (offsets still count from 0)."""
        if request_id in self.prefilling:
            return self.prefilling[request_id].snapshot(0, kv_from)
        return self.batch.snapshot(self.rows.index(request_id), kv_from)

    def join(self, request_id: str) -> None:
        """Move a request whose prompt is done into the decode batch."""
        if self.pending is not None:
            raise RuntimeError("a request joined the decode batch while a step launched ahead is pending")
        cache = self.prefilling.pop(request_id)
        if self.batch is None:
            self.batch = DecodeBatch(cache)
        else:
            self.batch.join(cache)
        self.rows.append(request_id)

    # ---- decode ----
    def decode(self, tokens: mx.array) -> mx.array:
        """Feed one token [B] per batch row (in row order; may be a not-yet-evaluated device array);
        returns logits [B, vocab]."""
        self.batch.fit(1)
        return self.model(tokens[:, None], self.batch)[:, -1]

    def take_pending(self) -> tuple[mx.array, mx.array]:
        pending, self.pending = self.pending, None
        return pending

    def release(self, request_ids: set[str]) -> None:
        for r in request_ids:
            self.prefilling.pop(r, None)
        keep = [i for i, r in enumerate(self.rows) if r not in request_ids]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.batch.keep(keep)
        else:
            self.batch = None
        if self.pending is not None:
            index = mx.array(keep)
            self.pending = tuple(a[index] for a in self.pending) if keep else None

    def clear(self) -> None:
        self.batch, self.rows, self.prefilling, self.pending = None, [], {}, None
