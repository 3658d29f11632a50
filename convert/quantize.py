"""MLX affine quantisation (mx.quantize's format) with an optional importance-weighted scale search.

Plain: mx.quantize (per group of g inputs: scale = (max - min) / (2^b - 1), bias = min).
Weighted: per group, choose (scale, bias) minimising sum_j importance_j * (w_j - dequant(w_j))^2.
Like llama.cpp's k-quant search: try a grid of inverse scales around the min/max one, round, refit
scale and bias by weighted least squares for those codes, keep the best; the min/max choice is one
candidate, so the weighted error is never worse than plain rounding.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .recipes import QuantSpec

MX_DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
SEARCH_STEPS = 4  # candidates nmax - 1 ... nmax + 1 in 2 * SEARCH_STEPS steps (10 gains <1% more)


def to_numpy(a: mx.array) -> np.ndarray:
    """Raw bytes of an MLX array as numpy (bfloat16 as uint16)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.asarray(a)  # shares the buffer when it can


def cast(x: mx.array, dtype: str) -> np.ndarray:
    """The stored bytes of x in `dtype` (bfloat16 rounded to nearest even)."""
    return to_numpy(x.astype(MX_DTYPES[dtype]))


def quantize(x: mx.array, spec: QuantSpec, dtype: str, importance: np.ndarray | None = None,
             weighted: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [..., in] -> (packed uint32 [..., in*bits/32], scales, biases [..., in/g]) as raw numpy
    arrays in `dtype`. `importance` broadcasts against x ([in] or [..., 1, in])."""
    w = mx.array(x).astype(MX_DTYPES[dtype])
    if not weighted:
        wq, scales, biases = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
    else:
        imp = mx.ones((x.shape[-1],)) if importance is None else mx.array(importance, dtype=mx.float32)
        codes, scales, biases = weighted_search(w.astype(mx.float32), imp, spec, MX_DTYPES[dtype])
        wq = pack(codes, spec.bits)
    mx.eval(wq, scales, biases)
    return to_numpy(wq), to_numpy(scales), to_numpy(biases)


def quantize_error(x: mx.array, col_scale: np.ndarray, importance: np.ndarray, spec: QuantSpec,
                   dtype: str) -> float:
    """sum importance * (dequant(quant(x * s)) / s - x)^2 with plain rounding (AWQ's alpha search)."""
    w = mx.array(x).astype(mx.float32)
    s = mx.array(np.asarray(col_scale, np.float32))
    ws = (w * s).astype(MX_DTYPES[dtype])
    q = mx.dequantize(*mx.quantize(ws, group_size=spec.group_size, bits=spec.bits),
                      group_size=spec.group_size, bits=spec.bits).astype(mx.float32) / s
    return float(mx.sum(mx.array(np.asarray(importance, np.float32)) * (q - w) ** 2).item())


def dequantize(wq, scales, biases, spec: QuantSpec) -> mx.array:
    return mx.dequantize(wq, scales, biases, group_size=spec.group_size, bits=spec.bits)


def _fit(L, W, Q, QW, sw, sx, sxx, dtype):
    """Weighted least squares for w ~ s * L + m per group (sums over the last axis), rounded to the
    stored dtype, and the error sum Q (s L + m - W)^2 expanded in the sums (no extra pass)."""
    QL = Q * L
    sl = QL.sum(-1, keepdims=True)
    sll = (QL * L).sum(-1, keepdims=True)
    sxl = (QW * L).sum(-1, keepdims=True)
    det = sw * sll - sl * sl
    ok = det > 1e-12 * sw * sll
    safe = mx.where(ok, det, 1.0)
    s = ((sw * sxl - sx * sl) / safe).astype(dtype).astype(mx.float32)
    m = ((sll * sx - sl * sxl) / safe).astype(dtype).astype(mx.float32)
    err = sxx - 2 * s * sxl - 2 * m * sx + s * s * sll + 2 * s * m * sl + m * m * sw
    return s, m, ok & (s > 0), err


def _codes(W, s, m, nmax, dtype):
    """(s, m) rounded as stored, and the nearest codes for them."""
    s, m = s.astype(dtype).astype(mx.float32), m.astype(dtype).astype(mx.float32)
    return mx.clip(mx.round((W - m) / mx.where(s == 0, 1.0, s)), 0, nmax)


def _error(W, Q, s, m, nmax, dtype):
    L = _codes(W, s, m, nmax, dtype)
    s, m = s.astype(dtype).astype(mx.float32), m.astype(dtype).astype(mx.float32)
    return (Q * (s * L + m - W) ** 2).sum(-1, keepdims=True)


def weighted_search(w: mx.array, importance: mx.array, spec: QuantSpec, dtype):
    """w [..., in] float32, importance broadcastable to w -> codes [..., in] uint32, scales and
    biases [..., in/g] in dtype."""
    shape = w.shape
    g, nmax = spec.group_size, 2**spec.bits - 1
    W = w.reshape(*shape[:-1], shape[-1] // g, g)
    Q = mx.broadcast_to(importance, shape).reshape(W.shape).astype(mx.float32)
    QW = Q * W
    sw, sx, sxx = Q.sum(-1, keepdims=True), QW.sum(-1, keepdims=True), (QW * W).sum(-1, keepdims=True)
    wmin, wmax = W.min(-1, keepdims=True), W.max(-1, keepdims=True)
    span = mx.maximum(wmax - wmin, 1e-30)
    base_s, base_m = span / nmax, wmin
    base_err = _error(W, Q, base_s, base_m, nmax, dtype)
    best_s, best_m, best_err = base_s, base_m, base_err
    for k in range(-SEARCH_STEPS, SEARCH_STEPS + 1):
        L = mx.clip(mx.round((W - wmin) * ((nmax + k / SEARCH_STEPS) / span)), 0, nmax)
        s, m, ok, err = _fit(L, W, Q, QW, sw, sx, sxx, dtype)
        better = ok & (err < best_err)
        best_s, best_m = mx.where(better, s, best_s), mx.where(better, m, best_m)
        best_err = mx.where(better, err, best_err)
        mx.eval(best_s, best_m, best_err)
    # the expanded error loses precision at 8 bits: keep min/max where it measures no worse
    worse = _error(W, Q, best_s, best_m, nmax, dtype) > base_err
    best_s, best_m = mx.where(worse, base_s, best_s), mx.where(worse, base_m, best_m)
    L = _codes(W, best_s, best_m, nmax, dtype)
    scales = best_s.astype(dtype).squeeze(-1)
    biases = best_m.astype(dtype).squeeze(-1)
    return L.reshape(shape).astype(mx.uint32), scales, biases


def pack(codes: mx.array, bits: int) -> mx.array:
    """Codes [..., n] -> uint32 [..., n*bits/32]: a little-endian bit stream, value j at bit j*bits
    (mx.quantize's layout for every width). Units of u codes fill whole bytes (u*bits <= 64)."""
    u = 8 // np.gcd(bits, 8)
    shape = codes.shape
    c = codes.reshape(*shape[:-1], shape[-1] // u, u).astype(mx.uint64)
    shifts = mx.array([bits * j for j in range(u)], dtype=mx.uint64)
    unit = mx.sum(mx.left_shift(c, shifts), axis=-1)  # [..., n/u] uint64, u*bits bits used
    nbytes = u * bits // 8
    byte_shifts = mx.array([8 * i for i in range(nbytes)], dtype=mx.uint64)
    b = mx.bitwise_and(mx.right_shift(unit[..., None], byte_shifts), 0xFF).astype(mx.uint8)
    return b.reshape(*shape[:-1], shape[-1] * bits // 8).view(mx.uint32)
