"""Owns the model's arrays: the decoding rows' state (a DecodeBatch: KV in length buckets), a
private cache per request still in prefill, and snapshots for the prefix cache. The only engine
module that runs MLX.

With speculative decoding (`speculative_tokens` K > 0) it also owns the MTP head's KV per row (a
second DecodeBatch, rows as the trunk's) and each row's pending MTP input: the trunk's hidden
states at the positions the head has not read yet, with the tokens fed there (the head reads
position j's hidden state with the token after it). The head's positions count from where the
request started computing: after a prefix-cache hit it sees only the positions computed since
(rope is relative, so those need no offset)."""

from __future__ import annotations

import mlx.core as mx

from model import Cache, Model
from model.cache import DecodeBatch, KVLayer, LinearLayer

# Pending MTP input beyond this many positions (a row that did not draft for long) is dropped
# from the front: the head then reads with a gap in its context, which costs acceptance only.
MAX_PENDING = 256


class Runner:
    def __init__(self, model: Model, speculative_tokens: int = 0):
        if speculative_tokens and not getattr(model, "mtp", None):
            raise ValueError("speculative decoding with method 'mtp' needs a model with MTP weights")
        self.model = model
        self.speculative = speculative_tokens
        self.batch: DecodeBatch | None = None
        self.rows: list[str] = []  # request id of each batch row
        self.prefilling: dict[str, Cache] = {}
        # (chosen tokens [B], logits [B, vocab]) of a decode step launched ahead (already fed into the
        # batch cache) whose tokens the engine has not read yet; rows as self.rows
        self.pending: tuple[mx.array, mx.array] | None = None
        # speculative decoding: the MTP head's KV (rows as self.rows, and per request in prefill),
        # each request's pending head input (hidden [n, H], tokens fed at those positions [n]), and
        # the last verify forward's (hidden [B, T, H], fed tokens per row, lengths) until `commit`
        self.mtp_batch: DecodeBatch | None = None
        self.mtp_prefilling: dict[str, Cache] = {}
        self.mtp_input: dict[str, tuple[mx.array, list[int]]] = {}
        self._verified: tuple[mx.array, list[list[int]], list[int]] | None = None

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

    def speculative_bytes(self) -> tuple[int, int]:
        """What speculative decoding adds per token (the MTP head's KV) and per sequence (a verify
        forward's per-position states and logits for K more positions, the head's pending input);
        (0, 0) when off. Apart from the two above, which the prefix cache's spacing also reads."""
        if not self.speculative:
            return 0, 0
        kv = sum(2 * layer.keys.itemsize * layer.keys.shape[1] * layer.keys.shape[3]
                 for layer in self.model.make_mtp_cache(1).layers)
        head = MAX_PENDING * self.model.config.hidden_size * self.model.compute_dtype.size
        return kv, self.speculative * self.state_bytes_per_seq() + head

    def live_bytes(self) -> int:
        """Bytes the running sequences' state holds: the decode batch, the caches still in
        prefill, the step launched ahead."""
        caches = ([self.batch] if self.batch is not None else []) + list(self.prefilling.values())
        caches += ([self.mtp_batch] if self.mtp_batch is not None else []) + list(self.mtp_prefilling.values())
        pending = sum(a.nbytes for a in self.pending) if self.pending is not None else 0
        return sum(c.nbytes for c in caches) + pending

    # ---- prefill ----
    def start(self, request_id: str, snapshot: Cache | None) -> None:
        """Begin a request from scratch or from a prefix-cache snapshot (which stays untouched)."""
        self.prefilling[request_id] = Cache.concat([snapshot]) if snapshot is not None else self.model.make_cache(1)
        if self.speculative:
            self.mtp_prefilling[request_id] = self.model.make_mtp_cache(1)

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
                out = self._forward_prompt(tokens, cache, [len(t) for _, t in group])
                caches = [cache.select([i]) for i in range(len(group))]
            except Exception:
                alone += group
                continue
            for i, (rid, t) in enumerate(group):
                self.prefilling[rid] = caches[i]
                logits[rid] = out[i, -1]
                if self.speculative:
                    self._read_prompt(rid, self._hidden[i, : len(t)], t)
        for rid, t in alone:
            try:
                logits[rid] = self._forward_prompt(mx.array(t)[None], self.prefilling[rid], None)[0, -1]
                if self.speculative:
                    self._read_prompt(rid, self._hidden[0], t)
            except Exception as e:
                logits[rid] = e
        # Parts of the new state lie off the logits' path (the conv window's tail): left lazy, each
        # would keep its whole chunk's inputs alive until the request's next forward.
        mx.async_eval([a for rid, _ in chunks if not isinstance(logits[rid], Exception)
                       for a in self.prefilling[rid].state()])
        return [logits[rid] for rid, _ in chunks]

    def _forward_prompt(self, tokens: mx.array, cache: Cache, lengths) -> mx.array:
        """The prompt forward (last logits only); with speculative decoding the hidden states of
        every position are kept in self._hidden for the MTP head."""
        if not self.speculative:
            return self.model(tokens, cache, lengths=lengths, last_only=True)
        out, self._hidden = self.model(tokens, cache, lengths=lengths, last_only=True, return_hidden=True)
        return out

    def _read_prompt(self, request_id: str, hidden: mx.array, tokens: list[int]) -> None:
        """The MTP head reads a prompt chunk's positions whose next token is known (all but the
        chunk's last); the last waits, as the row's pending input, for the next chunk or token."""
        before = self.mtp_input.get(request_id)
        if before is not None:
            hidden, tokens = mx.concatenate([before[0], hidden]), before[1] + list(tokens)
        if len(tokens) > 1:  # (the head's output here is not needed: only its KV)
            self._head(hidden[None, :-1], mx.array(tokens[1:])[None], self.mtp_prefilling[request_id])
        self.mtp_input[request_id] = (hidden[-1:], tokens[-1:])

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
        if self.speculative:
            mtp = self.mtp_prefilling.pop(request_id)
            if self.mtp_batch is None:
                self.mtp_batch = DecodeBatch(mtp)
            else:
                self.mtp_batch.join(mtp)

    # ---- decode ----
    def decode(self, tokens: mx.array) -> mx.array:
        """Feed one token [B] per batch row (in row order; may be a not-yet-evaluated device array);
        returns logits [B, vocab]. With speculative decoding the MTP head skips these positions: its
        rows start drafting again one verify step later, with a gap in the head's context."""
        for r in self.rows:
            self.mtp_input.pop(r, None)
        self.batch.fit(1)
        return self.model(tokens[:, None], self.batch)[:, -1]

    # ---- speculative decode ----
    def draft(self, last: list[int], k: list[int]) -> tuple[mx.array | None, list[int]]:
        """Row b's next k[b] tokens as the MTP head chains them greedily, [B, max k] on the device
        (None when no row drafts), and the drafts per row it made. `last`: each row's last chosen
        token (not fed yet). Every row with pending input hands it to the head (so that its KV
        keeps up); rows without (a prefix-cache hit that needed no prefill, rows just back from
        plain steps) draft nothing this step."""
        rows = [self.mtp_input.get(r) for r in self.rows]
        k = [kb if inp is not None else 0 for kb, inp in zip(k, rows)]
        K = max(k, default=0)
        if K == 0:
            return None, k
        lengths = [len(inp[1]) if inp is not None else 0 for inp in rows]
        T = max(lengths)
        H = self.model.config.hidden_size
        hidden = mx.stack([mx.pad(inp[0], [(0, T - n), (0, 0)]) if inp is not None else mx.zeros((T, H))
                           for inp, n in zip(rows, lengths)]).astype(self.model.compute_dtype)
        nxt = mx.array([(inp[1][1:] + [t] if inp is not None else []) + [0] * (T - n)
                        for inp, t, n in zip(rows, last, lengths)])
        for r in self.rows:
            self.mtp_input.pop(r, None)
        self.mtp_batch.fit(T)
        # the head's own normed output, its vocabulary projection at each row's last position only
        h = self._head(hidden, nxt, self.mtp_batch, lengths)
        at = mx.array([max(n, 1) - 1 for n in lengths])
        h = mx.take_along_axis(h, at[:, None, None], axis=1)
        read = list(self.mtp_batch.offsets)  # the chained steps below write KV the next round overwrites
        drafts = [mx.argmax(self.model.logits(h)[:, -1], axis=-1)]
        on = [1 if kb > 1 else 0 for kb in k]
        for _ in range(1, K):
            self.mtp_batch.fit(1)
            logits, h = self.model.draft(h, drafts[-1][:, None], self.mtp_batch, on)
            drafts.append(mx.argmax(logits[:, -1], axis=-1))
        self.mtp_batch.offsets = read
        return mx.stack(drafts, axis=1).astype(mx.uint32), k

    def _head(self, hidden, tokens, cache, lengths=None) -> mx.array:
        """The MTP head without its vocabulary projection: its normed output [B, T, H]."""
        return self.model.mtp(hidden, tokens, cache, self.model.language_model.model.embed_tokens,
                              lambda x: x, lengths)[1]

    def verify(self, last: list[int], drafted: mx.array | None, k: list[int]) -> mx.array:
        """Feed each row its last token and its first k[b] drafts (`draft`'s device array, so no
        wait between drafting and verifying; ragged: rows that did not draft feed one) in one
        forward that keeps every position's state; logits [B, 1 + max k, vocab]. `commit` then
        says how many positions each row keeps."""
        lengths = [1 + n for n in k]
        T = max(lengths)
        tokens = mx.array(last, dtype=mx.uint32)[:, None]
        if T > 1:
            tokens = mx.concatenate([tokens, drafted[:, : T - 1]], axis=1)
        self.batch.fit(T)
        logits, hidden = self.model(tokens, self.batch, lengths=lengths, return_hidden=True, keep_states=T > 1)
        self._verified = (hidden, lengths)
        return logits

    def commit(self, kept: list[int], fed: list[list[int]]) -> None:
        """Row b keeps the first kept[b] positions of the last `verify` (1..fed), whose tokens were
        fed[b] (its last token and drafts): the rest rolls back (recurrent and conv state from the
        kept position, KV past it masked), and the kept positions' hidden states become the head's
        pending input."""
        hidden, lengths = self._verified
        self._verified = None
        if max(lengths) > 1:
            self.batch.rollback(kept, lengths)
        for b, (r, n) in enumerate(zip(self.rows, kept)):
            h, toks = hidden[b, :n], fed[b][:n]
            before = self.mtp_input.get(r)
            if before is not None:
                h, toks = mx.concatenate([before[0], h])[-MAX_PENDING:], (before[1] + toks)[-MAX_PENDING:]
            self.mtp_input[r] = (h, toks)

    def take_pending(self) -> tuple[mx.array, mx.array]:
        pending, self.pending = self.pending, None
        return pending

    def release(self, request_ids: set[str]) -> None:
        for r in request_ids:
            self.prefilling.pop(r, None)
            self.mtp_prefilling.pop(r, None)
            self.mtp_input.pop(r, None)
        keep = [i for i, r in enumerate(self.rows) if r not in request_ids]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if keep:
            self.batch.keep(keep)
            if self.mtp_batch is not None:
                self.mtp_batch.keep(keep)
        else:
            self.batch = self.mtp_batch = None
        if self.pending is not None:
            index = mx.array(keep)
            self.pending = tuple(a[index] for a in self.pending) if keep else None

    def clear(self) -> None:
        self.batch, self.rows, self.prefilling, self.pending = None, [], {}, None
        self.mtp_batch, self.mtp_prefilling, self.mtp_input, self._verified = None, {}, {}, None
