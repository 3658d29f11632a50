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


# Drafting pays while one verify forward over every row's 1 + K positions costs about what one
# decode step costs: past this many positions per forward the depth shrinks, to 0 when the batch
# alone fills it (measured on the demo model, CPU: see the report / docs).
VERIFY_POSITIONS = 16


def draft_depths(K: int, remaining: list[int], drafting: list[bool]) -> list[int]:
    """Drafts per row this step: K, shrunk for a large batch (VERIFY_POSITIONS), never more than a
    row may still emit after the token it gets anyway (remaining - 1), 0 for rows that do not draft."""
    k = min(K, max(0, VERIFY_POSITIONS // max(len(remaining), 1) - 1))
    return [max(0, min(k, n - 1)) if ok else 0 for n, ok in zip(remaining, drafting)]
