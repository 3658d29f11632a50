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
    (powers of two), an average of emitted tokens per second for each depth; the best depth is
    used, each other one tried every EXPLORE steps so the averages follow changes (acceptance
    differs by text; a large batch makes the verify forward compute-bound, where drafting stops
    paying). Whether drafting pays depends on the machine and the model (on the CPU, with the
    4M-parameter demo model, verifying 2 positions costs 1.35x one at batch 1 and 1.6x at batch 4,
    and depth 0 wins; on a bandwidth-bound GPU a few more positions cost nearly nothing), which
    is why this measures instead of holding a table."""

    EXPLORE = 64  # a switch costs up to two slower steps (the step launched ahead ends, the head catches up)
    SAMPLES = 3  # steps per depth and bucket before the averages are trusted
    DECAY = 0.9

    def __init__(self, K: int, adapt: bool = True):
        self.K, self.adapt = K, adapt
        self.rate: dict[int, list[float]] = {}  # bucket -> tokens per second per depth
        self.count: dict[int, list[int]] = {}
        self.steps = 0

    @staticmethod
    def _bucket(rows: int) -> int:
        return max(rows, 1).bit_length()

    def choose(self, rows: int) -> int:
        if not self.adapt:
            return self.K
        b = self._bucket(rows)
        count = self.count.setdefault(b, [0] * (self.K + 1))
        rate = self.rate.setdefault(b, [0.0] * (self.K + 1))
        self.steps += 1
        fresh = [k for k in range(self.K + 1) if count[k] < self.SAMPLES]
        if fresh:
            return fresh[0]
        best = max(range(self.K + 1), key=rate.__getitem__)
        if self.steps % self.EXPLORE == 0:
            others = [k for k in range(self.K + 1) if k != best]
            return others[(self.steps // self.EXPLORE) % len(others)]
        return best

    def record(self, rows: int, depth: int, tokens: int, seconds: float) -> None:
        if not self.adapt or seconds <= 0:
            return
        b = self._bucket(rows)
        count = self.count.setdefault(b, [0] * (self.K + 1))
        rate = self.rate.setdefault(b, [0.0] * (self.K + 1))
        r = tokens / seconds
        rate[depth] = r if count[depth] == 0 else self.DECAY * rate[depth] + (1 - self.DECAY) * r
        count[depth] += 1


def draft_depths(k: int, remaining: list[int], drafting: list[bool]) -> list[int]:
    """Drafts per row this step: k (the controller's), never more than a row may still emit after
    the token it gets anyway (remaining - 1), 0 for rows that do not draft."""
    return [max(0, min(k, n - 1)) if ok else 0 for n, ok in zip(remaining, drafting)]
