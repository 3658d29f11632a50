"""The batched sampler against first principles in numpy: what temperature, top-k, top-p and min-p
leave, the frequencies its draws follow, and the logprobs it reports."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from server.engine.request import Request, SamplingParams
from server.engine.sampler import Sampler

LOGITS = np.array([2.0, 1.5, 1.4, 0.3, 0.2, 0.1, -0.5, -1.0, -3.0, -4.0, 5.0, -6.0], dtype=np.float32)


def expected(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0):
    """softmax(logits / T) over the k largest, then the smallest prefix (by probability) whose mass
    reaches top_p, and only tokens with at least min_p times the largest probability."""
    z = logits.astype(np.float64) / temperature
    if top_k:
        z[np.argsort(-z)[top_k:]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = p >= min_p * p.max()
    if top_p < 1.0:
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        keep[order[before >= top_p]] = False
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def draw(params: SamplingParams, n: int, logits=LOGITS) -> np.ndarray:
    """n rows of the same logits, each its own request and seed, chosen in one batch."""
    sampler = Sampler()
    reqs = []
    for i in range(n):
        req = Request(f"r{i}", [0], SamplingParams(**{**params.__dict__, "seed": i}))
        sampler.add(req)
        reqs.append(req)
    return np.array(sampler.choose(mx.array(np.tile(logits, (n, 1))), reqs))


CASES = [dict(temperature=1.0), dict(temperature=0.7, top_k=4), dict(temperature=1.3, top_p=0.8),
         dict(temperature=0.7, top_k=5, top_p=0.9), dict(temperature=2.0, min_p=0.2),
         dict(temperature=1.5, top_k=6, top_p=0.95, min_p=0.1)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_draws_follow_the_truncated_softmax(case):
    n = 2000
    p = expected(LOGITS, **case)
    counts = np.bincount(draw(SamplingParams(**case), n), minlength=len(LOGITS))
    assert counts[p == 0].sum() == 0  # what the filters exclude is never drawn
    # each kept token's count within 5 standard deviations of n * p (binomial)
    sd = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts - n * p) <= 5 * sd + 1), (counts, n * p)


def test_target_is_the_distribution_choose_draws_from():
    """What speculative acceptance reads (Sampler.target) is the same truncated softmax."""
    for case in CASES:
        req = Request("r", [0], SamplingParams(seed=0, **case))
        final, _ = Sampler().target(mx.array(LOGITS), req)
        np.testing.assert_allclose(np.array(mx.softmax(final)), expected(LOGITS, **case), atol=1e-6)


def test_a_rows_draws_do_not_depend_on_its_neighbours():
    """The same seed gives the same tokens alone and beside rows with other filters."""
    mine = SamplingParams(temperature=1.1, top_k=5, top_p=0.9, seed=7)
    others = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.5, top_k=9, seed=2),
              SamplingParams(temperature=0.9, top_p=0.7, seed=3), SamplingParams(temperature=0.0)]

    def run(params):
        sampler = Sampler()
        reqs = [Request(f"r{i}", [0], p) for i, p in enumerate(params)]
        for r in reqs:
            sampler.add(r)
        rows = mx.array(np.tile(LOGITS, (len(reqs), 1)))
        return [sampler.choose(rows, reqs).tolist()[0] for _ in range(20)]

    assert run([mine]) == run([mine, *others]) == run([mine, *others[::-1]])


def test_logprobs_are_log_softmax_and_the_largest_in_order():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32) * 3
    reqs = [Request("a", [0], SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)),
            Request("b", [0], SamplingParams(temperature=0.0)),
            Request("c", [0], SamplingParams(temperature=0.0, top_logprobs=2))]
    tokens, logprobs = Sampler().read(mx.array([3, 4, 5]), mx.array(logits), reqs)
    ref = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    assert tokens == [3, 4, 5] and logprobs[1] is None
    for row, want_top, lp in ((0, 5, logprobs[0]), (2, 2, logprobs[2])):
        assert lp.token_id == tokens[row]
        assert lp.logprob == pytest.approx(ref[row, tokens[row]], abs=1e-5)
        order = np.argsort(-ref[row])[:want_top]
        assert [t for t, _ in lp.top] == order.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], ref[row, order], atol=1e-5)


def test_greedy_rows_beside_sampled_ones_take_the_argmax():
    reqs = [Request("g", [0], SamplingParams(temperature=0.0)),
            Request("s", [0], SamplingParams(temperature=1.0, top_k=3, seed=1))]
    sampler = Sampler()
    for r in reqs:
        sampler.add(r)
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 40)).astype(np.float32)
    out = np.array(sampler.choose(mx.array(logits), reqs))
    assert out[0] == logits[0].argmax()
    assert out[1] in np.argsort(-logits[1])[:3]


def test_nan_is_never_chosen_and_infinite_logits_are_the_only_choices():
    """As the one-row path (Sampler.target) has it: NaN left out; +inf ones kept alone, drawn uniformly."""
    inf, nan = float("inf"), float("nan")
    logits = np.array([0.1, inf, -1.0, inf, 5.0, nan], dtype=np.float32)
    for case in (dict(temperature=1.0), dict(temperature=0.8, top_k=3), dict(temperature=0.8, min_p=0.1)):
        counts = np.bincount(draw(SamplingParams(**case), 400, logits), minlength=len(logits))
        assert counts[[0, 2, 4, 5]].sum() == 0 and min(counts[1], counts[3]) > 120, (case, counts)
    finite = np.array([0.1, nan, 2.0, -1.0], dtype=np.float32)
    assert set(draw(SamplingParams(temperature=1.0), 200, finite)) <= {0, 2, 3}
