"""Next-token choice per request: logits processors, penalties, temperature / top-k / top-p /
min-p, seeded draws that depend only on the request (not on what else is in the batch)."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np

from .request import Request, SamplingParams, TokenLogprob
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


TINY = float(np.finfo(np.float32).tiny)


def _plain(req: Request) -> bool:
    """Whether the row's token depends on its logits alone (no processors, no penalties): such rows
    are chosen together, over the batch at once."""
    p = req.params
    return not (p.logits_processors or p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty)


def _kept(x: mx.array, params: list[SamplingParams]) -> tuple[mx.array, mx.array | None]:
    """x [N, V] logits, one row per params -> (values [N, C], their token ids [N, C], or None when
    they are the whole vocabulary in order): the row's entries scaled by its temperature, those
    top-k, top-p and min-p exclude at -inf. Top-k takes the k largest (argpartition, exactly k),
    and top-p and min-p then look at those k alone (top-p sorts k entries, not the vocabulary;
    it sorts the vocabulary only for rows without top-k). Values are shifted so that each row's
    largest is 0 (softmax and argmax do not change), so no temperature overflows to inf or NaN;
    NaN logits are left out, and where a row has +inf ones, they alone are kept.
    With top-k or top-p, values are in descending order, else in token order: column j of a row
    means the same token whatever the other rows ask, as far as that row's own k reaches."""
    V = x.shape[-1]
    x = mx.where(mx.isnan(x), -float("inf"), x)  # a NaN logit is never chosen
    ks = [p.top_k if 0 < p.top_k < V else V for p in params]
    C = max(ks)
    # a temperature below float32's range is greedy, not a division by zero
    temps = mx.array([max(p.temperature, TINY) for p in params], dtype=mx.float32)[:, None]
    if C < V:
        ids = mx.argpartition(-x, C - 1, axis=-1)[:, :C]
        vals = mx.take_along_axis(x, ids, axis=-1)
    else:
        ids, vals = None, x
    if ids is not None or any(p.top_p < 1.0 for p in params):  # descending: top-k and top-p are prefixes
        order = mx.argsort(-vals, axis=-1)
        vals = mx.take_along_axis(vals, order, axis=-1)
        ids = order if ids is None else mx.take_along_axis(ids, order, axis=-1)
        top = vals[:, :1]
    else:
        top = vals.max(axis=-1, keepdims=True)
    # the largest at 0 (so +inf ones too: they stay the only choices, drawn uniformly)
    vals = mx.where(vals == top, 0.0, (vals - top) / temps)
    neg = mx.array(-float("inf"), dtype=vals.dtype)
    if any(k < C for k in ks):
        vals = mx.where(mx.arange(C)[None] >= mx.array(ks)[:, None], neg, vals)
    if any(p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        probs = mx.softmax(vals, axis=-1)
        drop = mx.zeros(vals.shape, dtype=mx.bool_)
        if any(p.min_p > 0.0 for p in params):
            min_p = mx.array([p.min_p for p in params], dtype=mx.float32)[:, None]
            drop = drop | (probs < min_p * probs.max(axis=-1, keepdims=True))
        if any(p.top_p < 1.0 for p in params):
            # keep the smallest prefix whose mass reaches top_p (the token crossing it included)
            top_p = mx.array([p.top_p if p.top_p < 1.0 else float("inf") for p in params], dtype=mx.float32)
            drop = drop | ((mx.cumsum(probs, axis=-1) - probs) >= top_p[:, None])
        vals = mx.where(drop, neg, vals)
    return vals, ids


def _truncate(logits: mx.array, req: Request) -> mx.array:
    """One row [V]: scaled by temperature, what top-k, top-p and min-p exclude at -inf (as `_kept`)."""
    p = req.params
    if not (0 < p.top_k < logits.shape[-1] or p.top_p < 1.0 or p.min_p > 0.0):
        return logits / p.temperature  # unshifted: an infinite logit stays the only choice (see target)
    vals, ids = _kept(logits[None], [p])
    if ids is None:
        return vals[0]
    out = mx.full(logits.shape, -float("inf"), dtype=vals.dtype)
    out[ids[0]] = vals[0]
    return out


class Sampler:
    def __init__(self):
        self._keys: dict[str, mx.array] = {}

    def add(self, req: Request) -> None:
        seed = req.params.seed if req.params.seed is not None else random.getrandbits(62)
        self._keys[req.id] = mx.random.key(seed)

    def remove(self, request_id: str) -> None:
        self._keys.pop(request_id, None)

    def _draw(self, req: Request, logits: mx.array) -> mx.array:
        return mx.random.categorical(logits, key=self._next_key(req))

    @staticmethod
    def needs_history(requests: list[Request]) -> bool:
        """Whether choosing needs the tokens generated so far on the host (penalties, processors)."""
        return not all(_plain(r) for r in requests)

    def choose(self, logits: mx.array, requests: list[Request], failed: dict | None = None) -> mx.array:
        """logits [B, vocab] for requests in row order -> chosen token ids [B], not yet evaluated.
        Rows without processors or penalties are chosen together (`_choose_plain`); the others one
        by one. A row whose own work raises (its logits processors, its penalties) is recorded in
        `failed` (request id -> the exception) and gets a placeholder token, so that one request's
        error leaves its neighbours' tokens alone; without `failed` the error propagates."""
        logits = logits.astype(mx.float32)
        plain = [i for i, r in enumerate(requests) if _plain(r)]
        if len(plain) == len(requests):
            return self._choose_plain(logits, requests)
        rows = {}
        if plain:
            chosen = self._choose_plain(logits[mx.array(plain)], [requests[i] for i in plain])
            rows = {i: chosen[j] for j, i in enumerate(plain)}
        for i, req in enumerate(requests):
            if i in rows:
                continue
            try:
                rows[i] = self._choose_row(logits[i], req)
            except Exception as e:
                if failed is None:
                    raise
                failed[req.id] = e
                rows[i] = mx.argmax(logits[i]).astype(mx.uint32)
        return mx.stack([rows[i] for i in range(len(requests))])

    def _choose_plain(self, logits: mx.array, requests: list[Request]) -> mx.array:
        """logits [N, V] float32 of rows whose token depends on their logits alone -> ids [N]: argmax
        at temperature 0, else a Gumbel-max draw (what mx.random.categorical does) over what `_kept`
        leaves, with noise from the row's own key. Rows go to `_kept` in groups whose column order
        is the same (top-k, top-p without top-k, neither), and each row's noise covers its own k
        columns only, so its draw never depends on its neighbours."""
        V = logits.shape[-1]
        out = mx.argmax(logits, axis=-1).astype(mx.uint32)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            p = r.params
            if p.temperature > 0:
                groups.setdefault("k" if 0 < p.top_k < V else "p" if p.top_p < 1.0 else "v", []).append(i)
        for rows in groups.values():
            x = logits if len(rows) == len(requests) else logits[mx.array(rows)]
            params = [requests[i].params for i in rows]
            vals, ids = _kept(x, params)
            C = vals.shape[-1]
            noise = []
            for i, p in zip(rows, params):
                n = p.top_k if 0 < p.top_k < C else C
                g = mx.random.gumbel((n,), key=self._next_key(requests[i]))
                noise.append(g if n == C else mx.concatenate([g, mx.zeros((C - n,), dtype=g.dtype)]))
            pick = mx.argmax(vals + mx.stack(noise), axis=-1)
            if ids is not None:
                pick = mx.take_along_axis(ids, pick[:, None], axis=-1)[:, 0]
            pick = pick.astype(mx.uint32)
            if len(rows) == len(requests):
                return pick
            out[mx.array(rows)] = pick
        return out

    def _next_key(self, req: Request) -> mx.array:
        key, sub = mx.random.split(self._keys[req.id])
        self._keys[req.id] = key
        return sub

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
        return np.array(mx.random.uniform(shape=(n,), key=self._next_key(req)), dtype=np.float64)

    def _choose_row(self, raw: mx.array, req: Request) -> mx.array:
        final, fallback = self.target(raw, req)
        if req.params.temperature == 0:
            pick = mx.argmax(final)
        else:
            pick = self._draw(req, final)
        return mx.where((final > -float("inf")).any(), pick, fallback).astype(mx.uint32)

    def read(self, chosen: mx.array, logits: mx.array, requests: list[Request]):
        """The chosen ids as ints, and their logprobs where a request asked for them (the rows that
        asked, at once: one log-sum-exp over their vocabularies, the top entries by argpartition)."""
        tokens = chosen.tolist()
        want = [i for i, r in enumerate(requests) if r.params.logprobs or r.params.top_logprobs > 0]
        if not want:
            return tokens, [None] * len(requests)
        rows = logits if len(want) == len(requests) else logits[mx.array(want)]
        rows = rows.astype(mx.float32)
        lse = mx.logsumexp(rows, axis=-1, keepdims=True)
        ids = mx.array([tokens[i] for i in want])[:, None]
        picked = mx.take_along_axis(rows, ids, axis=-1)[:, 0] - lse[:, 0]
        n = min(max(requests[i].params.top_logprobs for i in want), rows.shape[-1])
        top_ids = top_vals = None
        if n:
            top_ids = mx.argpartition(-rows, n - 1, axis=-1)[:, :n]
            top_vals = mx.take_along_axis(rows, top_ids, axis=-1)
            order = mx.argsort(-top_vals, axis=-1)
            top_ids = mx.take_along_axis(top_ids, order, axis=-1)
            top_vals = mx.take_along_axis(top_vals, order, axis=-1) - lse
            mx.eval(picked, top_ids, top_vals)
            top_ids, top_vals = top_ids.tolist(), top_vals.tolist()
        picked = picked.tolist()
        out = [None] * len(requests)
        for j, i in enumerate(want):
            k = requests[i].params.top_logprobs
            top = list(zip(top_ids[j][:k], top_vals[j][:k])) if k else []
            out[i] = TokenLogprob(tokens[i], picked[j], top)
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
