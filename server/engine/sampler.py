"""Next-token choice per request: logits processors, penalties, temperature / top-k / top-p /
min-p, seeded draws that depend only on the request (not on what else is in the batch)."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np

from .request import Request, TokenLogprob
from .speculative import accept_greedy, accept_sampled


def _penalise(logits: mx.array, req: Request, ahead: list[int]) -> mx.array:
    """`ahead`: tokens after the request's output so far (drafts being verified) that count as output."""
    p = req.params
    logits = mx.array(logits)  # a copy: the assignments below would change the caller's array too
    output = req.output_ids + list(ahead) if ahead else req.output_ids
    if p.repetition_penalty != 1.0:
        seen = mx.array(np.unique(np.asarray(req.all_ids + list(ahead), dtype=np.int64)))
        vals = logits[seen]
        logits[seen] = mx.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and output:
        ids, counts = np.unique(np.asarray(output, dtype=np.int64), return_counts=True)
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

    def choose(self, logits: mx.array, requests: list[Request], failed: dict | None = None) -> mx.array:
        """logits [B, vocab] for requests in row order -> chosen token ids [B], not yet evaluated.
        A row whose own work raises (its logits processors, its penalties) is recorded in `failed`
        (request id -> the exception) and gets a placeholder token, so that one request's error
        leaves its neighbours' tokens alone; without `failed` the error propagates."""
        logits = logits.astype(mx.float32)
        if all(r.params.temperature == 0 for r in requests) and not self.needs_history(requests):
            return mx.argmax(logits, axis=-1)
        rows = []
        for i, req in enumerate(requests):
            try:
                rows.append(self._choose_row(logits[i], req))
            except Exception as e:
                if failed is None:
                    raise
                failed[req.id] = e
                rows.append(mx.argmax(logits[i]))
        return mx.stack(rows)

    def target(self, raw: mx.array, req: Request, ahead: list[int] = ()) -> tuple[mx.array, mx.array]:
        """The logits a token is drawn from (softmax) or argmax'ed (temperature 0) after the request's
        processing, as if `ahead` had been generated already; and the token to take when they leave
        nothing allowed."""
        row = raw
        history = req.output_ids + list(ahead) if ahead else req.output_ids
        for proc in req.params.logits_processors:
            row = proc(history, row)
            if row.shape != raw.shape:
                raise ValueError(f"a logits processor returned shape {row.shape}, not {raw.shape}")
        # What the processors left at -inf (a grammar's mask) or NaN is never chosen, whatever
        # the penalties and temperature make of the rest: in float32, -inf * 0 is NaN and x / 0
        # is inf, and a NaN row would let categorical() or argmax() pick a masked token.
        blocked = mx.isnan(row) | (row == -float("inf"))
        masked = row
        row = _penalise(row, req, ahead)
        final = row if req.params.temperature == 0 else _truncate(row, req)
        final = mx.where(blocked | mx.isnan(final), -float("inf"), final)
        top = final == float("inf")  # inf / inf is NaN in softmax: keep only the infinite ones
        final = mx.where(top.any(), mx.where(top, 0.0, -float("inf")), final)
        # if nothing allowed is left: the allowed token the processors rated highest (the first
        # token when they blocked everything)
        return final, mx.argmax(mx.where(blocked, -float("inf"), masked))

    def uniforms(self, req: Request, n: int) -> np.ndarray:
        """n uniform draws in [0, 1) from the request's own seeded stream (speculative acceptance)."""
        key, sub = mx.random.split(self._keys[req.id])
        self._keys[req.id] = key
        return np.array(mx.random.uniform(shape=(n,), key=sub), dtype=np.float64)

    def _choose_row(self, raw: mx.array, req: Request) -> mx.array:
        final, fallback = self.target(raw, req)
        if req.params.temperature == 0:
            pick = mx.argmax(final)
        else:
            pick = self._draw(req, final)
        return mx.where((final > -float("inf")).any(), pick, fallback).astype(mx.uint32)

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

    def accept(self, logits: mx.array, requests: list[Request], drafts: list[list[int]],
               failed: dict | None = None) -> list[tuple[list[int], list]]:
        """Speculative decoding: logits [B, T, vocab] of a verify forward (row b's position i read
        its i-th fed token: the last chosen one, then drafts[b]) -> per row, the emitted tokens
        (speculative.py's rule; each follows exactly what `choose` would draw from) and their
        logprobs where asked. Rows that raise go to `failed` (then emit nothing) as in `choose`."""
        logits = logits.astype(mx.float32)
        if all(r.params.temperature == 0 for r in requests) and not self.needs_history(requests):
            argmax = mx.argmax(logits, axis=-1).tolist()
            emitted = [accept_greedy(argmax[b], d) for b, d in enumerate(drafts)]
        else:
            emitted = []
            for b, req in enumerate(requests):
                try:
                    emitted.append(self._accept_row(logits[b], req, drafts[b]))
                except Exception as e:
                    if failed is None:
                        raise
                    failed[req.id] = e
                    emitted.append([])
        out = []
        for b, (req, tokens) in enumerate(zip(requests, emitted)):
            if not tokens:
                out.append(([], []))
                continue
            n = len(tokens)
            out.append(self.read(mx.array(tokens), logits[b, :n], [req] * n))
        return out

    def _accept_row(self, logits: mx.array, req: Request, drafts: list[int]) -> list[int]:
        targets = [self.target(logits[i], req, drafts[:i]) for i in range(len(drafts) + 1)]
        finals = mx.stack([f for f, _ in targets])
        fallbacks = [int(f) for _, f in targets]
        allowed = np.array((finals > -float("inf")).any(axis=-1))
        if req.params.temperature == 0:
            best = mx.argmax(finals, axis=-1).tolist()
            return accept_greedy([b if ok else f for b, ok, f in zip(best, allowed, fallbacks)], drafts)
        probs = np.array(mx.softmax(finals, axis=-1), dtype=np.float64)
        for i in np.flatnonzero(~allowed):  # nothing allowed: the fallback, as `choose` takes it
            probs[i] = 0.0
            probs[i, fallbacks[i]] = 1.0
        return accept_sampled(probs, drafts, self.uniforms(req, 2 * len(targets)))

    def __call__(self, logits: mx.array, requests: list[Request]):
        """logits [B, vocab] for requests in row order -> (token ids, logprobs)."""
        return self.read(self.choose(logits, requests), logits, requests)
