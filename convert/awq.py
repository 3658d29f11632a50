"""Imatrix-guided scaling: AWQ-style pre-scaling and the per-tensor importance for scale search.

A group is one producer whose output feeds consumers linearly: a norm and the projections reading
it, or an MLP's up_proj rows and its down_proj columns (h = silu(gate) * up is linear in up's
rows). Per input channel s = importance^alpha (normalised to geometric mid-range 1); consumers'
columns are multiplied by s and the producer divided by s, so the float model is unchanged while
important channels get finer quantisation steps. Scaling up_proj's rows costs nothing: an affine
group lies within one row, so a whole-row scale changes its error in proportion.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .imatrix import Entry

ALPHA = 0.5
ALPHAS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75)  # tried per group with alpha "auto"
IMPORTANCE_FLOOR = 1e-4  # of the mean: channels never seen still get a finite scale

_INPUT_CONSUMERS = ("linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.in_proj_a",
                    "linear_attn.in_proj_b", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_POST_CONSUMERS = ("mlp.gate", "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.shared_expert.gate_proj",
                   "mlp.shared_expert.up_proj", "mlp.shared_expert_gate", "mlp.gate_proj", "mlp.up_proj")
_DOWN_PAIRS = (("mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj"),
               ("mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"),
               ("mlp.up_proj", "mlp.down_proj"))


@dataclass
class Group:
    name: str
    importance: np.ndarray  # [C] or [E, C]: what the scale is derived from
    alpha: float
    producer: str  # divided by scale (a norm's weight, or rows of an up_proj)
    consumers: list[str]  # columns multiplied by scale

    @property
    def scale(self) -> np.ndarray:
        return scales_from(self.importance, self.alpha)


@dataclass
class AwqPlan:
    groups: list[Group] = field(default_factory=list)
    col_scale: dict[str, np.ndarray] = field(default_factory=dict)
    row_div: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, group: Group) -> None:
        self.groups.append(group)
        self._index(group)

    def _index(self, group: Group) -> None:
        scale = group.scale
        self.row_div[group.producer] = scale
        for c in group.consumers:
            self.col_scale[c] = scale

    def set_alpha(self, group: Group, alpha: float) -> None:
        group.alpha = alpha
        self._index(group)


def scales_from(importance: np.ndarray, alpha: float) -> np.ndarray:
    """importance [..., C] -> s [..., C] = imp^alpha / sqrt(max * min) along C, in float32."""
    imp = np.asarray(importance, np.float64)
    imp = np.maximum(imp, IMPORTANCE_FLOOR * imp.mean(-1, keepdims=True) + 1e-30)
    s = imp**alpha
    s = s / np.sqrt(s.max(-1, keepdims=True) * s.min(-1, keepdims=True))
    return s.astype(np.float32)


def _combined(entries: list[Entry]) -> np.ndarray:
    """One importance per input channel for consumers sharing an input, weighted by the tokens each
    matrix saw (an expert counts only the tokens routed to it)."""
    sum2 = sum(e.sum2.sum(0) for e in entries)
    counts = sum(e.counts.sum() for e in entries)
    return sum2 / max(counts, 1e-30)


def _layer_prefixes(names) -> list[str]:
    prefixes = set()
    for n in names:
        for marker in ("language_model.model.layers.", "mtp.layers."):
            if n.startswith(marker):
                i = n.split(".")[len(marker.split(".")) - 1]
                prefixes.add(f"{marker}{i}.")
    return sorted(prefixes, key=lambda p: (p.startswith("mtp"), int(p.rstrip(".").split(".")[-1])))


def plan_awq(shapes: dict[str, tuple], importance: dict[str, Entry], alpha: float = ALPHA,
             tied: bool = False) -> AwqPlan:
    """Groups for every producer with measured consumers, all at `alpha` (see choose_alphas)."""
    plan = AwqPlan()
    for p in _layer_prefixes(shapes):
        for norm, consumers in (("input_layernorm", _INPUT_CONSUMERS), ("post_attention_layernorm", _POST_CONSUMERS)):
            present = [f"{p}{c}.weight" for c in consumers if f"{p}{c}.weight" in shapes]
            measured = [importance[c] for c in present if c in importance]
            if f"{p}{norm}.weight" in shapes and measured:
                plan.add(Group(f"{p}{norm}", _combined(measured), alpha, f"{p}{norm}.weight", present))
        for up, down in _DOWN_PAIRS:
            up, down = f"{p}{up}.weight", f"{p}{down}.weight"
            if up in shapes and down in shapes and down in importance:
                imp = importance[down].importance()  # [n_mat, I]
                plan.add(Group(down.removesuffix(".weight") + ".input", imp if len(shapes[down]) == 3 else imp[0],
                               alpha, up, [down]))
    head = "language_model.lm_head.weight"
    if not tied and head in shapes and head in importance:
        plan.add(Group("language_model.model.norm", _combined([importance[head]]), alpha,
                       "language_model.model.norm.weight", [head]))
    return plan


def apply(x: mx.array, name: str, plan: AwqPlan, start: int, stop: int) -> mx.array:
    """Scale rows [start, stop) (leading axis) of tensor `name` as the plan says (in float32)."""
    s = plan.col_scale.get(name)
    d = plan.row_div.get(name)
    if s is None and d is None:
        return x
    x = x.astype(mx.float32)
    if s is not None:
        x = x * mx.array(s[start:stop, None, :] if s.ndim == 2 else s)
    if d is not None:
        if x.ndim == 1:
            x = x / mx.array(d[start:stop])
        elif d.ndim == 2:  # per-expert rows [E, I] of [E, I, H]
            x = x / mx.array(d[start:stop, :, None])
        else:
            x = x / mx.array(d[start:stop, None])
    return x


def tensor_importance(name: str, shape: tuple, importance: dict[str, Entry], plan: AwqPlan | None):
    """Per-column error weights for the scale search of tensor `name` after scaling: the
    imatrix mean squared input divided by s^2 (the scaled weight sees inputs x / s).
    [in] for 2-D tensors, [E, in] for expert stacks; None where the imatrix has nothing."""
    e = importance.get(name)
    if e is None:
        return None
    imp = e.importance()
    imp = imp if len(shape) == 3 else imp[0]
    s = plan.col_scale.get(name) if plan else None
    if s is not None:
        imp = imp / s.astype(np.float64) ** 2
    imp = np.maximum(imp, IMPORTANCE_FLOOR * imp.mean(-1, keepdims=True) + 1e-30)
    return (imp / imp.mean(-1, keepdims=True)).astype(np.float32)


def choose_alphas(plan: AwqPlan, tensors: dict, specs: dict, importance: dict[str, Entry], dtype: str,
                  candidates=ALPHAS, chunk_elements: int = 16 * 2**20, sample_elements: int = 32 * 2**20) -> None:
    """Per group, the alpha minimising the imatrix-weighted quantisation error of its consumers:
    sum_j importance_j * (dequant(quant(W * s)) / s - W)_ij^2, i.e. the expected squared output
    error with independent inputs. alpha 0 (no scaling) is a candidate, so no group gets worse by
    this measure. Consumers left unquantised by the recipe do not vote. The error is estimated on
    evenly spaced leading-axis rows (output rows, or whole experts of a stack) of at most
    `sample_elements` weights per consumer: the search then costs a bounded fraction of a pass over
    the model instead of len(candidates) passes."""
    from .quantize import quantize_error

    for group in plan.groups:
        errors = np.zeros(len(candidates))
        scales = [scales_from(group.importance, a) for a in candidates]
        for name in group.consumers:
            spec = specs.get(name)
            if spec is None:
                continue
            t = tensors[name]
            own = importance.get(name)
            if own is None:
                imp = group.importance
            else:
                imp = own.importance() if len(t.shape) == 3 else own.importance()[0]
            n = t.shape[0]
            row_elements = max(1, t.numel // n)
            rows = np.arange(0, n, -(-n * row_elements // sample_elements))
            step = max(1, chunk_elements // row_elements)
            weight = n / len(rows)  # the sample stands for the whole tensor among the group's consumers
            for a in range(0, len(rows), step):
                index = rows[a:a + step]
                x = t.take(index)
                w = imp[index, None, :] if imp.ndim == 2 else imp
                for i, s in enumerate(scales):
                    cols = s[index, None, :] if s.ndim == 2 else s
                    errors[i] += weight * quantize_error(x, cols, w, spec, dtype)
            t.release()
        plan.set_alpha(group, float(candidates[int(np.argmin(errors))]))
