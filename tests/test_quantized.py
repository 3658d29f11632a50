"""The CPU backend's dequantise-then-BLAS path agrees with MLX's quantised kernels (its twin)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from model import quantized
from model.switch import QuantizedSwitchLinear, SwitchLinear


def _quantised(shape, bits, seed, dtype=mx.float32):
    w = mx.random.normal(shape, key=mx.random.key(seed)) * 0.05
    return mx.quantize(w.astype(dtype), group_size=64, bits=bits)  # scales and biases in `dtype`


def _close(a, b):
    a, b = np.array(a), np.array(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("shape", [(200, 128), (3, 40, 256)])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_dequantize_is_mlxs_in_float32_bit_for_bit(bits, shape, dtype):
    w, s, b = _quantised(shape, bits, bits, dtype)
    want = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=64, bits=bits)
    got = quantized.dequantize(w, s, b, 64, bits)
    assert got.dtype == mx.float32 and mx.array_equal(got, want).item()


@pytest.mark.parametrize("bits", [4, 5, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])  # bf16 scales: as mlx-lm's checkpoints store them
@pytest.mark.parametrize("slice_bytes", [64 << 20, 40 * 128 * 4])  # one slice; uneven slices of 40 rows
def test_dense_dequantised_path_equals_the_kernel(monkeypatch, bits, dtype, slice_bytes):
    monkeypatch.setattr(quantized, "DEQUANT_SLICE_BYTES", slice_bytes)
    monkeypatch.setattr(quantized._blas, "loaded", "libopenblas.so.0")  # the path is taken only with OpenBLAS
    w, s, b = _quantised((200, 128), bits, 0, dtype)
    x = mx.random.normal((2, 24, 128), key=mx.random.key(1))
    assert quantized.dequantize_pays(48)
    got = quantized.quantized_matmul(x, w, s, b, 64, bits)
    want = mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=bits)
    _close(got, want)


@pytest.mark.parametrize("openblas", [True, False])
def test_quantized_linear_takes_the_dequantised_path_for_many_rows_with_openblas_only(monkeypatch, openblas):
    """The reference BLAS does not repay dequantising (quantized.py's docstring): without OpenBLAS the
    kernel runs at every row count."""
    monkeypatch.setattr(quantized._blas, "loaded", "libopenblas.so.0" if openblas else None)
    layer = quantized.Linear(128, 96, bias=True).to_quantized(group_size=64, bits=4)
    assert isinstance(layer, quantized.QuantizedLinear) and isinstance(layer, nn.QuantizedLinear)
    calls = []
    real = quantized.dequantize
    monkeypatch.setattr(quantized, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    for rows in (1, quantized.DEQUANT_MIN_ROWS - 1, quantized.DEQUANT_MIN_ROWS, 100):
        calls.clear()
        x = mx.random.normal((rows, 128), key=mx.random.key(rows))
        want = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True, group_size=64,
                                   bits=4) + layer.bias
        _close(layer(x), want)
        assert bool(calls) == (openblas and rows >= quantized.DEQUANT_MIN_ROWS)


def test_sorted_experts_mix_dequantised_and_kernel_rows():
    E, n_in, n_out = 8, 128, 64
    layer = QuantizedSwitchLinear.from_switch(SwitchLinear(n_in, n_out, E), 64, 4, "affine")
    layer.weight, layer.scales, layer.biases = _quantised((E, n_out, n_in), 4, 2, mx.bfloat16)
    # rich experts (>= DEQUANT_MIN_ROWS rows) next to runs of poor and empty ones, at both ends
    counts = [20, 0, 3, 1, 40, 16, 0, 5]
    idx = mx.array(np.repeat(np.arange(E), counts).astype(np.uint32))
    x = mx.random.normal((int(sum(counts)), 1, n_in), key=mx.random.key(3))
    want = mx.gather_qmm(x, layer.weight, layer.scales, layer.biases, rhs_indices=idx, transpose=True,
                         group_size=64, bits=4, sorted_indices=True)
    got = quantized.sorted_expert_matmul(x, layer.weight, layer.scales, layer.biases, idx, 64, 4)
    _close(got, want)
    _close(layer(x, idx, sorted_indices=True), want)  # enough rows: the layer takes this path itself
