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
