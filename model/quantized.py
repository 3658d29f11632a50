"""Quantised matmuls, and the CPU backend's faster way to run them over many rows.

MLX's quantised kernels are the fast path on Metal and CUDA. On the CPU backend they run at about
1 GMAC/s on one thread, while dequantising costs ~8-13 ns per weight and OpenBLAS (see _blas.py)
multiplies floats at 30+ GMAC/s. So on the CPU with OpenBLAS loaded, when at least `DEQUANT_MIN_ROWS`
rows meet one weight (prefill, or a large decode batch), we dequantise the weight, in slices of at
most `DEQUANT_SLICE_BYTES`, and use a float matmul: the same products (the dequantised weights are
exactly what the kernel multiplies by), summed in another order. The wheel's reference BLAS (~1.2
GMAC/s) does not repay the dequantising (`python -m bench.cpu_qmm`, 8192x2048 4-bit: 0.48x at 16
rows, 0.94x at 512; a 152k-vocabulary lm_head at 16 rows 10.5 against 6.2 ms per row), so without
OpenBLAS the kernel runs. Sorted experts that many rows meet are dequantised one expert at a time
either way: that beats gather_qmm even with the reference BLAS (64x512x2048, 512 tokens top-8: 1.31x;
one quantised matmul per expert instead: 0.93x).
"""

from __future__ import annotations

from itertools import groupby

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import _blas

DEQUANT_MIN_ROWS = 16  # measured crossover on x86 (bench/cpu_qmm.py): ~12 rows
DEQUANT_SLICE_BYTES = 64 << 20  # bounds the transient float copy of a weight


_UNPACKERS: dict = {}


def dequantize(w, scales, biases, group_size: int, bits: int, mode: str = "affine"):
    """The float32 weights the quantised kernels multiply by. For affine weights the arithmetic is done in
    float32 even when scales and biases are bf16/fp16 (mx.dequantize would round the weights to their
    dtype, ~0.4% apart from what the kernel computes with); 2/4/8-bit ones go through compiled shifts and
    masks, bit-for-bit mx.dequantize's float32 result and 1.9-2.7x faster on the CPU backend."""
    if mode != "affine" or biases is None:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode).astype(mx.float32)
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    if bits not in (2, 4, 8):
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits, mode=mode)
    if (bits, group_size) not in _UNPACKERS:

        def unpack(w, scales, biases):
            shifts = mx.arange(0, 32, bits, dtype=mx.uint32)
            q = ((w[..., None] >> shifts) & ((1 << bits) - 1)).astype(mx.float32)
            q = q.reshape(*scales.shape, group_size)
            return (q * scales[..., None] + biases[..., None]).reshape(*w.shape[:-1], -1)

        _UNPACKERS[bits, group_size] = mx.compile(unpack)
    return _UNPACKERS[bits, group_size](w, scales, biases)


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def experts_apart_pay(rows: int) -> bool:
    """Whether sorted experts with this many rows on average go through sorted_expert_matmul."""
    return rows >= DEQUANT_MIN_ROWS and on_cpu()


def dequantize_pays(rows: int) -> bool:
    return experts_apart_pay(rows) and _blas.loaded is not None


def quantized_matmul(x, w, scales, biases, group_size: int, bits: int, mode: str = "affine"):
    """x [..., in] @ W.T for the quantised W [out, in] held as (w, scales, biases)."""
    if not dequantize_pays(x.size // x.shape[-1]):
        return mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode)
    return dequantized_matmul(x, w, scales, biases, group_size, bits, mode)


def dequantized_matmul(x, w, scales, biases, group_size: int, bits: int, mode: str = "affine"):
    """quantized_matmul's product through the dequantised weight, in slices, and a float matmul."""
    out_dims = scales.shape[0]
    step = max(1, DEQUANT_SLICE_BYTES // (x.shape[-1] * 4))  # float32 slices
    parts = []
    for start in range(0, out_dims, step):
        end = min(out_dims, start + step)
        part = dequantize(w[start:end], scales[start:end], None if biases is None else biases[start:end],
                          group_size, bits, mode)
        parts.append(x @ part.astype(x.dtype).T)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def sorted_expert_matmul(x, w, scales, biases, indices, group_size: int, bits: int, mode: str = "affine"):
    """x [R, 1, in] with sorted expert `indices` [R] -> [R, 1, out] on the CPU backend: experts with at
    least DEQUANT_MIN_ROWS rows go through a dequantised float matmul each, runs of the others through
    one gather_qmm. Reads the indices on the host (one synchronisation per call)."""
    counts = np.bincount(np.asarray(indices), minlength=w.shape[0])
    flat = x.reshape(-1, x.shape[-1])
    outs, row = [], 0
    for rich, run in groupby(range(len(counts)), key=lambda e: counts[e] >= DEQUANT_MIN_ROWS):
        run = list(run)
        if rich:
            for e in run:
                n = int(counts[e])
                sel = (w[e], scales[e], None if biases is None else biases[e])
                outs.append(dequantized_matmul(flat[row:row + n], *sel, group_size, bits, mode))
                row += n
        elif n := int(counts[run].sum()):
            y = mx.gather_qmm(x[row:row + n], w, scales, biases, rhs_indices=indices[row:row + n], transpose=True,
                              group_size=group_size, bits=bits, mode=mode, sorted_indices=True)
            outs.append(y.reshape(n, -1))
            row += n
    return mx.concatenate(outs).reshape(*x.shape[:-1], -1)


class QuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x):
        y = quantized_matmul(x, self["weight"], self["scales"], self.get("biases"), self.group_size, self.bits,
                             self.mode)
        return y + self["bias"] if "bias" in self else y


class Linear(nn.Linear):
    """nn.Linear whose quantised form is our QuantizedLinear."""

    def to_quantized(self, group_size=None, bits=None, mode="affine", quantize_input=False):
        if quantize_input:
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)
