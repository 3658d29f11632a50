"""The gated delta rule: a one-step recurrence (decode, reference) and a chunked matmul form (prefill).

Shapes: q, k [B, T, Hv, Dk] (already expanded from Hk to Hv heads, L2-normalised, q scaled);
v [B, T, Hv, Dv]; g (log-decay) and beta [B, T, Hv]; state [B, Hv, Dk, Dv]; all float32.
Per token: S = S * exp(g); S = S + k (beta * (v - S^T k))^T; o = S^T q.
Padding a position with g = 0 and beta = 0 leaves the state untouched, which is how callers
mask the unused tail of shorter sequences in a batch.
"""

from __future__ import annotations

import mlx.core as mx

CHUNK = 64


@mx.compile
def l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    x = x.astype(mx.float32)
    return x * mx.rsqrt(mx.sum(x * x, axis=-1, keepdims=True) + eps)


@mx.compile
def step(q, k, v, g, beta, state):
    """One token: q, k [B, Hv, Dk], v [B, Hv, Dv], g, beta [B, Hv] -> (o [B, Hv, Dv], state)."""
    state = state * mx.exp(g)[..., None, None]
    kv = mx.sum(state * k[..., None], axis=-2)  # [B, Hv, Dv]
    delta = (v - kv) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    return mx.sum(state * q[..., None], axis=-2), state


def recurrent(q, k, v, g, beta, state, keep_states: bool = False):
    """Token-by-token recurrence. Returns (o [B, T, Hv, Dv], final state), and with `keep_states`
    the state after every position [B, T, Hv, Dk, Dv] as well (speculative decoding rolls back
    to one of them)."""
    outs, states = [], []
    for t in range(q.shape[1]):
        o, state = step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state)
        outs.append(o)
        states.append(state)
    if keep_states:
        return mx.stack(outs, axis=1), state, mx.stack(states, axis=1)
    return mx.stack(outs, axis=1), state


def unit_lower_inverse(a: mx.array) -> mx.array:
    """Inverse of I + tril(a, -1) for a [..., n, n] with n a power of two, by block doubling.

    inv([[L11, 0], [L21, L22]]) = [[X11, 0], [-X22 L21 X11, X22]]; each level inverts all
    diagonal blocks of the next size at once, so the cost is log2(n) batched matmuls.
    """
    n = a.shape[-1]
    lead = a.shape[:-2]
    inv = mx.ones((*lead, n, 1, 1), dtype=a.dtype)
    b = 1
    while b < n:
        m = n // (2 * b)
        pairs = inv.reshape(*lead, m, 2, b, b)
        x11, x22 = pairs[..., 0, :, :], pairs[..., 1, :, :]
        base = mx.arange(m)[:, None] * (2 * b)
        rows = (base + b + mx.arange(b))[:, :, None]
        cols = (base + mx.arange(b))[:, None, :]
        l21 = a[..., rows, cols]  # [..., m, b, b]
        x21 = -(x22 @ l21 @ x11)
        zeros = mx.zeros_like(x11)
        top = mx.concatenate([x11, zeros], axis=-1)
        bottom = mx.concatenate([x21, x22], axis=-1)
        inv = mx.concatenate([top, bottom], axis=-2)  # [..., m, 2b, 2b]
        b *= 2
    return inv.reshape(*lead, n, n)


def chunked(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same recurrence in chunks of `chunk` tokens with the UT (WY) transform."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    pad = (-T) % chunk
    if pad:
        q, k, v = (mx.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)]) for x in (q, k, v))
        g, beta = (mx.pad(x, [(0, 0), (0, pad), (0, 0)]) for x in (g, beta))
    N = (T + pad) // chunk

    def split(x):  # [B, T', H, D] -> [B, H, N, C, D]
        return x.reshape(B, N, chunk, H, x.shape[-1]).transpose(0, 3, 1, 2, 4)

    q, k, v = split(q), split(k), split(v)
    g = g.reshape(B, N, chunk, H).transpose(0, 3, 1, 2)  # [B, H, N, C]
    beta = beta.reshape(B, N, chunk, H).transpose(0, 3, 1, 2)

    gc = mx.cumsum(g, axis=-1)
    idx = mx.arange(chunk)
    causal = idx[:, None] >= idx[None, :]
    diff = gc[..., :, None] - gc[..., None, :]
    decay = mx.where(causal, mx.exp(mx.where(causal, diff, 0.0)), 0.0)  # [B, H, N, C, C]

    k_beta = k * beta[..., None]
    v_beta = v * beta[..., None]
    strict = idx[:, None] > idx[None, :]
    a = mx.where(strict, (k_beta @ k.swapaxes(-1, -2)) * decay, 0.0)
    t_inv = unit_lower_inverse(a)
    u = t_inv @ v_beta  # [B, H, N, C, Dv]
    w = t_inv @ (k_beta * mx.exp(gc)[..., None])  # [B, H, N, C, Dk]

    intra = (q @ k.swapaxes(-1, -2)) * decay
    q_dec = q * mx.exp(gc)[..., None]
    g_last = gc[..., -1:]
    k_dec = k * mx.exp(g_last - gc)[..., None]
    chunk_decay = mx.exp(g_last)[..., None]  # [B, H, N, 1, 1]

    outs = []
    for n in range(N):
        v_new = u[:, :, n] - w[:, :, n] @ state
        outs.append(q_dec[:, :, n] @ state + intra[:, :, n] @ v_new)
        state = state * chunk_decay[:, :, n] + k_dec[:, :, n].swapaxes(-1, -2) @ v_new
    o = mx.stack(outs, axis=2).reshape(B, H, N * chunk, Dv).transpose(0, 2, 1, 3)
    return o[:, :T], state


def gated_delta(q, k, v, g, beta, state, chunk_threshold: int = 16, keep_states: bool = False):
    """Chooses the chunked form for long inputs and the recurrence for short ones. `keep_states`
    (a verify forward of a few positions) takes the recurrence and returns every position's state."""
    if keep_states:
        return recurrent(q, k, v, g, beta, state, keep_states=True)
    if q.shape[1] >= chunk_threshold:
        return chunked(q, k, v, g, beta, state)
    return recurrent(q, k, v, g, beta, state)
