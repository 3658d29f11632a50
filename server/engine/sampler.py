"""Next-token choice per request: logits processors, penalties, temperature / top-k / top-p /
min-p, seeded draws that depend only on the request (not on what else is in the batch)."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np

from .request import Request, TokenLogprob


def _penalise(logits: mx.array, req: Request) -> mx.array:
    p = req.params
    if p.repetition_penalty != 1.0:
        seen = mx.array(np.unique(np.asarray(req.all_ids, dtype=np.int64)))
        vals = logits[seen]
        logits[seen] = mx.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and req.output_ids:
        ids, counts = np.unique(np.asarray(req.output_ids, dtype=np.int64), return_counts=True)
        ids = mx.array(ids)
        logits[ids] = logits[ids] - p.presence_penalty - p.frequency_penalty * mx.array(counts, dtype=mx.float32)
    return logits


def _truncate(logits: mx.array, req: Request) -> mx.array:
    """Scale by temperature and mask what top-k, top-p and min-p exclude."""
    p = req.params
    logits = logits / p.temperature
    neg = mx.array(-float("inf"), dtype=logits.dtype)
    if 0 < p.top_k < logits.shape[-1]:
        kth = mx.sort(logits)[-p.top_k]
        logits = mx.where(logits < kth, neg, logits)
    if p.top_p < 1.0 or p.min_p > 0.0:
        probs = mx.softmax(logits)
        if p.min_p > 0.0:
            logits = mx.where(probs < p.min_p * probs.max(), neg, logits)
        if p.top_p < 1.0:
            order = mx.argsort(-probs)
            sorted_probs = probs[order]
            # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
            drop_sorted = (mx.cumsum(sorted_probs) - sorted_probs) >= p.top_p
            drop = mx.zeros_like(drop_sorted)
            drop[order] = drop_sorted
            logits = mx.where(drop, neg, logits)
    return logits


class Sampler:
    def __init__(self):
        self._keys: dict[str, mx.array] = {}

    def add(self, req: Request) -> None:
        seed = req.params.seed if req.params.seed is not None else random.getrandbits(62)
        self._keys[req.id] = mx.random.key(seed)

    def remove(self, request_id: str) -> None:
        self._keys.pop(request_id, None)

    def _draw(self, req: Request, logits: mx.array) -> mx.array:
        key, sub = mx.random.split(self._keys[req.id])
        self._keys[req.id] = key
        return mx.random.categorical(logits, key=sub)

    @staticmethod
    def needs_history(requests: list[Request]) -> bool:
        """Whether choosing needs the tokens generated so far on the host (penalties, processors)."""
        return any(r.params.logits_processors or r.params.repetition_penalty != 1.0
                   or r.params.presence_penalty or r.params.frequency_penalty for r in requests)

    def choose(self, logits: mx.array, requests: list[Request]) -> mx.array:
        """logits [B, vocab] for requests in row order -> chosen token ids [B], not yet evaluated."""
        logits = logits.astype(mx.float32)
        if all(r.params.temperature == 0 for r in requests) and not self.needs_history(requests):
            return mx.argmax(logits, axis=-1)
        rows = []
        for i, req in enumerate(requests):
            row = logits[i]
            for proc in req.params.logits_processors:
                row = proc(req.output_ids, row)
            row = _penalise(row, req)
            if req.params.temperature == 0:
                rows.append(mx.argmax(row))
            else:
                rows.append(self._draw(req, _truncate(row, req)))
        return mx.stack(rows)

    def read(self, chosen: mx.array, logits: mx.array, requests: list[Request]):
        """The chosen ids as ints, and their logprobs where a request asked for them."""
        tokens = chosen.tolist()
        want = [r.params.logprobs or r.params.top_logprobs > 0 for r in requests]
        if not any(want):
            return tokens, [None] * len(requests)
        logits = logits.astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        out = []
        for i, req in enumerate(requests):
            if not want[i]:
                out.append(None)
                continue
            row = logp[i]
            top = []
            if req.params.top_logprobs:
                ids = mx.argsort(-row)[: req.params.top_logprobs]
                top = list(zip(ids.tolist(), row[ids].tolist()))
            out.append(TokenLogprob(tokens[i], row[tokens[i]].item(), top))
        return tokens, out

    def __call__(self, logits: mx.array, requests: list[Request]):
        """logits [B, vocab] for requests in row order -> (token ids, logprobs)."""
        return self.read(self.choose(logits, requests), logits, requests)
