"""The chunked (UT transform) gated delta rule against the plain recurrence, and the block
inverse against numpy's solver."""

import mlx.core as mx
import numpy as np
import pytest

from model.gated_delta import chunked, l2norm, recurrent, unit_lower_inverse


def inputs(B, T, H, Dk, Dv, seed):
    mx.random.seed(seed)
    q = l2norm(mx.random.normal((B, T, H, Dk))) * Dk**-0.5
    k = l2norm(mx.random.normal((B, T, H, Dk)))
    v = mx.random.normal((B, T, H, Dv))
    g = -mx.random.uniform(0.0, 3.0, (B, T, H))
    beta = mx.sigmoid(mx.random.normal((B, T, H)))
    s0 = mx.random.normal((B, H, Dk, Dv)) * 0.5
    return q, k, v, g, beta, s0


@pytest.mark.parametrize("T", [1, 5, 64, 65, 200])
@pytest.mark.parametrize("Dk,Dv", [(16, 16), (16, 32)])
def test_chunked_equals_recurrence(T, Dk, Dv):
    q, k, v, g, beta, s0 = inputs(2, T, 4, Dk, Dv, seed=T)
    o_ref, s_ref = recurrent(q, k, v, g, beta, s0)
    o, s = chunked(q, k, v, g, beta, s0)
    scale = float(mx.abs(o_ref).max())
    assert float(mx.abs(o - o_ref).max()) <= 1e-5 * max(scale, 1.0)
    assert float(mx.abs(s - s_ref).max()) <= 1e-5 * max(float(mx.abs(s_ref).max()), 1.0)


def test_zero_gate_and_beta_leave_state_untouched():
    q, k, v, g, beta, s0 = inputs(1, 70, 2, 16, 16, seed=1)
    _, s = chunked(q, k, v, mx.zeros_like(g), mx.zeros_like(beta), s0)
    assert float(mx.abs(s - s0).max()) == 0.0


def test_unit_lower_inverse_matches_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(scale=0.2, size=(3, 64, 64)).astype(np.float32)
    ours = np.array(unit_lower_inverse(mx.array(a)))
    m = np.eye(64) + np.tril(a, -1)
    ref = np.linalg.inv(m.astype(np.float64))
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
