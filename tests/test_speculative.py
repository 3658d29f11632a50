"""Speculative decoding with the MTP head: rollback of a verify forward, the acceptance rule, and the
engine's output with drafting on against the same engine with it off.

The expected values come from first principles: a rollback must leave exactly the state a fresh
forward over the accepted tokens leaves, and output with drafting must equal output without it at
temperature 0 (drafting may only change speed); with sampling, the emitted tokens must follow the
main model's distribution (a chi-square test against that distribution, fixed seeds)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from fixtures.mtp import MTP_FIXTURES, get_mtp_fixture

from model import load_model
from model.cache import DecodeBatch

K = 3


def _model(name):
    return load_model(get_mtp_fixture(name).hf_dir, dtype="float32")


def _solo(model, ids):
    """Reference: a fresh cache fed `ids[:-1]`, then the logits after `ids[-1]`."""
    cache = model.make_cache(1)
    model(mx.array(ids[:-1])[None], cache)
    return np.array(model(mx.array(ids[-1:])[None], cache)[0, -1])


@pytest.mark.parametrize("name", MTP_FIXTURES)
def test_rollback_to_every_position_equals_a_fresh_forward(name):
    """Two decode rows at different lengths: row 0 verifies K+1 positions, row 1 feeds one (ragged);
    after keeping the first `kept` positions of row 0, both rows' next logits are their solo ones."""
    model = _model(name)
    ids = get_mtp_fixture(name).prompt_ids.tolist()
    n0, n1 = 9, 14
    for kept in range(1, K + 2):
        batch = None
        for n in (n0, n1):
            cache = model.make_cache(1)
            model(mx.array(ids[:n])[None], cache)
            batch = DecodeBatch(cache) if batch is None else (batch.join(cache) or batch)
        batch.fit(K + 1)
        fed = [K + 1, 1]
        rows = [ids[n0 : n0 + K + 1], ids[n1 : n1 + 1] + [0] * K]
        model(mx.array(rows), batch, lengths=fed, keep_states=True)
        batch.rollback([kept, 1], fed)
        assert batch.offsets == [n0 + kept, n1 + 1]
        nxt = [ids[n0 + kept], ids[n1 + 1]]
        batch.fit(1)
        out = np.array(model(mx.array(nxt)[:, None], batch)[:, -1])
        np.testing.assert_allclose(out[0], _solo(model, ids[: n0 + kept + 1]), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(out[1], _solo(model, ids[: n1 + 2]), atol=1e-5, rtol=1e-5)


# chi-square critical values at alpha = 1e-3 (standard tables), by degrees of freedom
CHI2_CRIT = {4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def _chi2(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    n = counts.sum()
    return float((((counts - n * p) ** 2)[keep] / (n * p[keep])).sum()), int(keep.sum() - 1)


def _p(logits, temperature, top_k):
    """First principles: softmax(logits / T) over the top_k largest."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z[np.argsort(-z)[top_k:]] = -np.inf
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize("draft0", [0, 3, 7])  # the likeliest token, a middling one, one top-k excludes
def test_emitted_tokens_follow_the_main_models_distribution(draft0):
    from server.engine.speculative import accept_sampled

    rng = np.random.default_rng(1234)
    V, N = 8, 40000
    l0 = np.array([3.0, 2.2, 2.0, 1.5, 1.0, 0.5, -0.5, -1.0])
    l1 = np.array([0.1, 1.7, -0.3, 2.5, 0.9, 1.2, 0.0, 2.0])
    probs = np.stack([_p(l0, 0.8, 6), _p(l1, 0.8, 6), _p(l0[::-1], 0.8, 6)])
    drafts = [draft0, 3]  # the second position's p given the first draft accepted, then the bonus's
    first, second = np.zeros(V, int), np.zeros(V, int)
    for u in rng.random((N, 6)):
        out = accept_sampled(probs, drafts, u)
        first[out[0]] += 1
        if out[0] == draft0:
            assert len(out) in (2, 3) and (len(out) == 3) == (out[1] == 3)
            second[out[1]] += 1
        else:
            assert len(out) == 1
    stat, df = _chi2(first, probs[0])
    assert stat < CHI2_CRIT[df], (stat, first / N, probs[0])
    if probs[0][draft0] > 0:
        stat, df = _chi2(second, probs[1])
        assert stat < CHI2_CRIT[df], (stat, second / second.sum(), probs[1])
    else:
        assert second.sum() == 0


def test_the_sampler_verifies_against_what_plain_decoding_draws_from():
    """Sampler.target (what `accept` reads) is the processed distribution: penalties on the output
    so far plus the drafts ahead of the position, temperature, top-k, min-p."""
    from server.engine.request import Request, SamplingParams
    from server.engine.sampler import Sampler

    raw = np.array([3.0, 2.2, 2.0, 1.5, 1.0, 0.5, -0.5, -1.0], dtype=np.float32)
    params = SamplingParams(temperature=0.7, top_k=6, presence_penalty=0.5, frequency_penalty=0.25, seed=3)
    req = Request("r", [5, 6], params, output_ids=[1, 1])
    final, _ = Sampler().target(mx.array(raw), req, ahead=[2])
    expected = raw.astype(np.float64) - [0, 0.5 + 2 * 0.25, 0.5 + 0.25, 0, 0, 0, 0, 0]
    p = np.array(mx.softmax(final))
    np.testing.assert_allclose(p, _p(expected, 0.7, 6), atol=1e-6)
