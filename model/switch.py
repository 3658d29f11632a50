"""Stacked expert weights applied through gather matmuls (no Python loop over experts)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .quantized import experts_apart_pay, on_cpu, sorted_expert_matmul


@partial(mx.compile, shapeless=True)
def swiglu(gate, up):
    return nn.silu(gate) * up


class SwitchLinear(nn.Module):
    """weight [E, out, in]; x [..., 1, in] with indices [..., k] -> [..., k, 1, out]."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))

    def __call__(self, x, indices, sorted_indices=False):
        w = self.weight
        dtype = x.dtype
        if on_cpu() and (dtype != mx.float32 or w.dtype != mx.float32):
            # MLX's CPU gather_mm only supports float32.
            x, w = x.astype(mx.float32), w.astype(mx.float32)
        y = mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices)
        return y.astype(dtype)

    def to_quantized(self, group_size=None, bits=None, mode="affine", **_):
        return QuantizedSwitchLinear.from_switch(self, group_size or 64, bits or 4, mode)


class QuantizedSwitchLinear(nn.Module):
    def __init__(self, input_dims, output_dims, num_experts, group_size=64, bits=4, mode="affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *rest = mx.quantize(
            mx.zeros((num_experts, output_dims, input_dims)), group_size=group_size, bits=bits, mode=mode
        )
        if rest:
            self.biases = rest[0]
        self.freeze()

    @classmethod
    def from_switch(cls, layer: SwitchLinear, group_size, bits, mode):
        E, out, inp = layer.weight.shape
        q = cls(inp, out, E, group_size, bits, mode)
        q.weight, q.scales, *rest = mx.quantize(layer.weight, group_size=group_size, bits=bits, mode=mode)
        if rest:
            q.biases = rest[0]
        return q

    def __call__(self, x, indices, sorted_indices=False):
        if sorted_indices and experts_apart_pay(2 * indices.size // self.weight.shape[0]):
            # On the CPU, with half the crossover's rows per expert on average or more, the experts that
            # many rows meet are cheaper dequantised (see quantized.py).
            return sorted_expert_matmul(x, self.weight, self.scales, self.get("biases"), indices,
                                        self.group_size, self.bits, self.mode)
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )


class SwitchGLU(nn.Module):
    """SwiGLU experts: down(silu(gate(x)) * up(x)) for each of the k chosen experts."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = SwitchLinear(hidden, intermediate, num_experts)
        self.up_proj = SwitchLinear(hidden, intermediate, num_experts)
        self.down_proj = SwitchLinear(intermediate, hidden, num_experts)

    def reads_host(self, assignments: int) -> bool:
        """Whether N rows with k experts each (assignments = N * k) take the path that reads the
        expert indices on the host (which a compiled function cannot)."""
        return assignments >= 64 and experts_apart_pay(2 * assignments // self.num_experts)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [N, H], indices [N, k] -> [N, k, H]."""
        N, k = indices.shape
        if N * k >= 64:
            # Sorting tokens by expert makes each expert's rows contiguous for the gather matmul.
            flat = indices.flatten()
            order = mx.argsort(flat)
            inv = mx.argsort(order)
            xs = mx.expand_dims(x[order // k], -2)  # [N*k, 1, H]
            idx = flat[order]
            h = swiglu(self.gate_proj(xs, idx, True), self.up_proj(xs, idx, True))
            y = self.down_proj(h, idx, True)[inv]  # [N*k, 1, H]
            return y.reshape(N, k, -1)
        xs = x[:, None, None, :]  # [N, 1, 1, H]
        h = swiglu(self.gate_proj(xs, indices), self.up_proj(xs, indices))
        return self.down_proj(h, indices).squeeze(-2)
