"""Speculative decoding's acceptance rule: which of a row's drafted tokens the main model keeps.

Drafts are greedy (the MTP head's argmax), so the draft distribution q is one-hot and speculative
rejection sampling (Leviathan et al. 2023; Chen et al. 2023) becomes: accept draft x with
probability min(1, p(x) / q(x)) = p(x); on rejection draw from norm(max(0, p - q)), which is p with
x removed; after every draft is accepted, the bonus token comes from p at the next position. Each
emitted token then follows p exactly, p being the main model's distribution after the request's
own processing (the sampler's `target`). At temperature 0 this is the longest prefix of drafts
equal to the main model's argmax, plus its next token. Plain functions over host data: the
uniforms come from the caller (the request's seeded stream), so a test can run millions of rows.
"""

from __future__ import annotations

import numpy as np


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """targets: the main model's choice at each of the len(drafts) + 1 positions -> emitted tokens
    (1 .. len(drafts) + 1): the drafts up to the first mismatch, then the main model's token."""
    out = []
    for target, draft in zip(targets, drafts):
        out.append(target)
        if target != draft:
            return out
    out.append(targets[len(drafts)])
    return out


def _draw(p: np.ndarray, u: float) -> int:
    """Inverse CDF of the (unnormalised) weights p at u in [0, 1)."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, u * c[-1], side="right"), len(p) - 1))


def accept_sampled(probs: np.ndarray, drafts: list[int], u: np.ndarray) -> list[int]:
    """probs [len(drafts) + 1, V]: p at each position (row i as if drafts[:i] were accepted);
    u [2 * (len(drafts) + 1)] uniforms in [0, 1) -> emitted tokens."""
    out = []
    for i, x in enumerate(drafts):
        p = probs[i]
        if u[2 * i] < p[x]:
            out.append(int(x))
            continue
        residual = p.copy()
        residual[x] = 0.0
        # p(x) == 1 up to rounding leaves nothing: then x was the only choice
        out.append(_draw(residual, u[2 * i + 1]) if residual.sum() > 0 else int(x))
        return out
    out.append(_draw(probs[len(drafts)], u[2 * len(drafts) + 1]))
    return out


class DepthController:
    """Chooses the draft depth (0..K) per step from measured throughput: per batch-size bucket
    (powers of two), an average of emitted tokens per second for each depth, and the best depth is
    used. Whether drafting pays depends on the machine and the model (on the CPU a verify position
    costs about what a row does, and depth 0 wins; on a bandwidth-bound GPU a few more positions cost
    nearly nothing), which is why this measures instead of holding a table. What measuring costs is
    kept small, since a losing speculative step can cost 2-4 plain ones:
    - depths are first measured shallow to deep, a deeper one only while the one before it kept up
      (within PRUNE of the best so far): a deeper draft costs more and its extra tokens are rarer;
    - afterwards only the depths next to the best are tried again (so the averages follow changes:
      acceptance differs by text, load by batch), each after EXPLORE steps of its bucket, an interval
      that doubles (up to MAX_EXPLORE) each time the depth loses again."""

    EXPLORE = 64
    MAX_EXPLORE = 4096
    SAMPLES = 3  # steps per depth and bucket before its average is trusted
    PRUNE = 0.9
    DECAY = 0.9  # the best depth's average; a retried depth's moves halfway to each new measurement

    def __init__(self, K: int, adapt: bool = True):
        self.K, self.adapt = K, adapt
        self.buckets: dict[int, dict[str, list]] = {}

    def _state(self, rows: int) -> dict[str, list]:
        b = max(rows, 1).bit_length()
        if b not in self.buckets:
            n = self.K + 1
            self.buckets[b] = {"rate": [0.0] * n, "count": [0] * n, "wait": [self.EXPLORE] * n,
                               "due": [self.EXPLORE] * n, "steps": [0]}
        return self.buckets[b]

    def _best(self, s) -> int:
        measured = [k for k in range(self.K + 1) if s["count"][k] >= self.SAMPLES] or [0]
        return max(measured, key=s["rate"].__getitem__)

    def choose(self, rows: int) -> int:
        if not self.adapt:
            return self.K
        s = self._state(rows)
        s["steps"][0] += 1
        rate, count = s["rate"], s["count"]
        for k in range(self.K + 1):
            if count[k] < self.SAMPLES:
                if k == 0 or rate[k - 1] >= self.PRUNE * max(rate[:k]):
                    return k
                break
        best = self._best(s)
        for k in (best - 1, best + 1):
            if 0 <= k <= self.K and s["steps"][0] >= s["due"][k]:
                s["due"][k] = s["steps"][0] + s["wait"][k]
                return k
        return best

    def record(self, rows: int, depth: int, tokens: int, seconds: float) -> None:
        if not self.adapt or seconds <= 0:
            return
        s = self._state(rows)
        rate, count = s["rate"], s["count"]
        best = self._best(s)
        r = tokens / seconds
        if count[depth] == 0:
            rate[depth] = r
        else:
            keep = self.DECAY if depth == best or count[depth] < self.SAMPLES else 0.5
            rate[depth] = keep * rate[depth] + (1 - keep) * r
        count[depth] += 1
        if depth != best and count[depth] > self.SAMPLES:  # a retry: back off while it keeps losing
            s["wait"][depth] = (min(2 * s["wait"][depth], self.MAX_EXPLORE) if rate[depth] < rate[best]
                                else self.EXPLORE)


def draft_depths(k: int, remaining: list[int], drafting: list[bool]) -> list[int]:
    """Drafts per row this step: k (the controller's), never more than a row may still emit after
    the token it gets anyway (remaining - 1), 0 for rows that do not draft."""
    return [max(0, min(k, n - 1)) if ok else 0 for n, ok in zip(remaining, drafting)]
