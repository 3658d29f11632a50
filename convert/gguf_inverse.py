"""llama.cpp's qwen35 / qwen35moe GGUF names -> ours, with the transforms its converter applied undone.

One table (RULES). Each row: the GGUF name inside a block (or a global name), our name, and the
inverse transforms, applied left to right. What llama.cpp's conversion/qwen.py does and we undo:
  A_log -> -exp(A_log)  (undo: log(-x));  norms get +1 (kept: our layout holds 1 + w too);
  conv1d [C, 1, K] squeezed to [C, K]  (undo: [C, K, 1], our layout);
  linear-attention V heads reordered grouped -> tiled when Hv != Hk  (undo: the general inverse
  permutation below, right for any r = Hv / Hk);  per-expert tensors stacked (kept).
The imatrix reader uses the same table, so its columns get the same inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import tensor as T
from .errors import ConvertError
from .tensor import LazyTensor

LAYER = "language_model.model.layers.{n}."
MTP_LAYER = "mtp.layers.{n}."


@dataclass(frozen=True)
class Geometry:
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    n_heads: int
    n_kv: int
    head_dim: int
    n_layers: int
    layer_types: tuple[str, ...]

    @classmethod
    def from_config(cls, c: dict) -> Geometry:
        return cls(c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                   c["linear_value_head_dim"], c["num_attention_heads"], c["num_key_value_heads"],
                   c["head_dim"], c["num_hidden_layers"], tuple(c["layer_types"]))

    @property
    def qk_channels(self) -> int:
        return 2 * self.k_heads * self.k_dim


def v_head_order(k_heads: int, v_heads: int, d: int) -> np.ndarray:
    """perm with ours[i] = gguf[perm[i]] over Hv heads of d rows each.

    Ours (HF) is grouped: head j*r + v is the v-th value head of key head j. GGUF is tiled: that head
    sits at v*Hk + j. So [Hk, r, d] in our order is [r, Hk, d] in GGUF's order, transposed."""
    r = v_heads // k_heads
    heads = np.arange(v_heads).reshape(r, k_heads).T.reshape(-1)  # ours j*r+v -> gguf v*Hk+j
    return (heads[:, None] * d + np.arange(d)).reshape(-1)


def _v_perm(g: Geometry, d: int, offset: int = 0) -> np.ndarray:
    return np.concatenate([np.arange(offset), offset + v_head_order(g.k_heads, g.v_heads, d)])


# Inverse transforms: (LazyTensor, Geometry) -> LazyTensor.
def _v_rows_qkv(t, g):  # in_proj_qkv rows / conv1d channels: [Q | K | V], only V reordered
    return T.permute_rows(t, _v_perm(g, g.v_dim, g.qk_channels))


def _v_rows(t, g):  # in_proj_z rows
    return T.permute_rows(t, _v_perm(g, g.v_dim))


def _v_heads(t, g):  # one row (or element) per v head: in_proj_a/b, A_log, dt_bias
    return T.permute_rows(t, _v_perm(g, 1))


def _v_cols(t, g):  # out_proj columns
    return T.permute_cols(t, _v_perm(g, g.v_dim))


def _log_neg(t, g):  # ssm_a = -exp(A_log)
    return T.map_values(t, lambda x: mx.log(-x.astype(mx.float32)))


def _conv(t, g):  # [C, K] -> [C, K, 1]
    return T.reshape(t, (*t.shape[:2], 1)) if len(t.shape) == 2 else t


def _row_vector(t, g):  # ffn_gate_inp_shexp [H] (or [1, H]) -> [1, H]
    return T.reshape(t, (1, t.numel))


INVERSES = {
    "v_rows_qkv": _v_rows_qkv, "v_rows": _v_rows, "v_heads": _v_heads, "v_cols": _v_cols,
    "log_neg": _log_neg, "conv": _conv, "row_vector": _row_vector,
}


@dataclass(frozen=True)
class Rule:
    gguf: str  # name inside blk.N. (or global, for GLOBAL rules)
    ours: str  # name inside the layer prefix (or global)
    undo: tuple[str, ...] = ()
    linear_only: bool = False  # V reorder applies only where Hv != Hk; these rows are linear attention


GLOBAL = (
    Rule("token_embd.weight", "language_model.model.embed_tokens.weight"),
    Rule("output.weight", "language_model.lm_head.weight"),
    Rule("output_norm.weight", "language_model.model.norm.weight"),
)
BLOCK = (
    Rule("attn_norm.weight", "input_layernorm.weight"),
    Rule("post_attention_norm.weight", "post_attention_layernorm.weight"),
    # full attention (attn_q holds query and gate interleaved per head, as HF's q_proj does)
    Rule("attn_q.weight", "self_attn.q_proj.weight"),
    Rule("attn_k.weight", "self_attn.k_proj.weight"),
    Rule("attn_v.weight", "self_attn.v_proj.weight"),
    Rule("attn_output.weight", "self_attn.o_proj.weight"),
    Rule("attn_q_norm.weight", "self_attn.q_norm.weight"),
    Rule("attn_k_norm.weight", "self_attn.k_norm.weight"),
    # GatedDeltaNet
    Rule("attn_qkv.weight", "linear_attn.in_proj_qkv.weight", ("v_rows_qkv",), True),
    Rule("attn_gate.weight", "linear_attn.in_proj_z.weight", ("v_rows",), True),
    Rule("ssm_beta.weight", "linear_attn.in_proj_b.weight", ("v_heads",), True),
    Rule("ssm_alpha.weight", "linear_attn.in_proj_a.weight", ("v_heads",), True),
    Rule("ssm_conv1d.weight", "linear_attn.conv1d.weight", ("v_rows_qkv", "conv"), True),
    Rule("ssm_dt.bias", "linear_attn.dt_bias", ("v_heads",), True),
    Rule("ssm_a", "linear_attn.A_log", ("v_heads", "log_neg"), True),
    Rule("ssm_norm.weight", "linear_attn.norm.weight"),
    Rule("ssm_out.weight", "linear_attn.out_proj.weight", ("v_cols",), True),
    # MoE
    Rule("ffn_gate_inp.weight", "mlp.gate.weight"),
    Rule("ffn_gate_exps.weight", "mlp.switch_mlp.gate_proj.weight"),
    Rule("ffn_up_exps.weight", "mlp.switch_mlp.up_proj.weight"),
    Rule("ffn_down_exps.weight", "mlp.switch_mlp.down_proj.weight"),
    Rule("ffn_gate_inp_shexp.weight", "mlp.shared_expert_gate.weight", ("row_vector",)),
    Rule("ffn_gate_shexp.weight", "mlp.shared_expert.gate_proj.weight"),
    Rule("ffn_up_shexp.weight", "mlp.shared_expert.up_proj.weight"),
    Rule("ffn_down_shexp.weight", "mlp.shared_expert.down_proj.weight"),
    # dense MLP
    Rule("ffn_gate.weight", "mlp.gate_proj.weight"),
    Rule("ffn_up.weight", "mlp.up_proj.weight"),
    Rule("ffn_down.weight", "mlp.down_proj.weight"),
)
MTP = (  # block blk.{n_layers}: the MTP head, kept under HF's mtp.* names
    Rule("nextn.eh_proj.weight", "mtp.fc.weight"),
    Rule("nextn.enorm.weight", "mtp.pre_fc_norm_embedding.weight"),
    Rule("nextn.hnorm.weight", "mtp.pre_fc_norm_hidden.weight"),
    Rule("nextn.shared_head_norm.weight", "mtp.norm.weight"),
    Rule("nextn.embed_tokens.weight", "mtp.embed_tokens.weight"),
    Rule("nextn.shared_head_head.weight", "mtp.lm_head.weight"),
)
# Fused variants some GGUFs carry: one tensor -> several of ours.
FUSED_GATE_UP = "ffn_gate_up_exps.weight"
_BY_NAME = {r.gguf: r for r in BLOCK}
_GLOBAL_BY_NAME = {r.gguf: r for r in GLOBAL}
_MTP_BY_NAME = {r.gguf: r for r in MTP}


def _split_block(name: str) -> tuple[int, str] | None:
    if not name.startswith("blk."):
        return None
    _, n, rest = name.split(".", 2)
    return int(n), rest


def target_names(name: str, g: Geometry) -> list[tuple[str, Rule | None]]:
    """Our name(s) for a GGUF tensor name: [(ours, rule)], [] if it is not a weight we know.
    Fused tensors give several names with rule None."""
    if name in _GLOBAL_BY_NAME:
        return [(_GLOBAL_BY_NAME[name].ours, _GLOBAL_BY_NAME[name])]
    split = _split_block(name)
    if split is None:
        return []
    n, rest = split
    if n >= g.n_layers:
        if rest in _MTP_BY_NAME:
            return [(_MTP_BY_NAME[rest].ours, _MTP_BY_NAME[rest])]
        prefix = MTP_LAYER.format(n=n - g.n_layers)
    else:
        prefix = LAYER.format(n=n)
    if rest == FUSED_GATE_UP:
        return [(prefix + "mlp.switch_mlp.gate_proj.weight", None), (prefix + "mlp.switch_mlp.up_proj.weight", None)]
    full_attention = n >= g.n_layers or g.layer_types[n] == "full_attention"
    if rest == "attn_qkv.weight" and full_attention:  # fused q/k/v of a full-attention block
        return [(prefix + f"self_attn.{p}.weight", None) for p in ("q_proj", "k_proj", "v_proj")]
    rule = _BY_NAME.get(rest)
    return [(prefix + rule.ours, rule)] if rule else []


def apply_undo(t: LazyTensor, rule: Rule, g: Geometry) -> LazyTensor:
    for step in rule.undo:
        if rule.linear_only and step.startswith("v_") and g.k_heads == g.v_heads:
            continue
        t = INVERSES[step](t, g)
    return t


def gguf_tensors(gguf, g: Geometry) -> dict[str, LazyTensor]:
    """Every tensor of a GGUF model, in our layout and names. Unknown names are an error."""
    out: dict[str, LazyTensor] = {}
    for name in gguf.tensors:
        targets = target_names(name, g)
        if not targets:
            raise ConvertError(f"{gguf.parts[0]}: tensor {name} has no counterpart in a Qwen3.5 checkpoint")
        src = gguf.lazy(name)
        if len(targets) == 1 and targets[0][1] is not None:
            ours, rule = targets[0]
            out[ours] = apply_undo(src, rule, g)
        elif name.endswith(FUSED_GATE_UP):
            half = src.shape[1] // 2
            out[targets[0][0]] = T.slice_axis1(src, 0, half)
            out[targets[1][0]] = T.slice_axis1(src, half, 2 * half)
        else:  # fused attention q/k/v
            q_rows = g.n_heads * g.head_dim * 2
            kv_rows = g.n_kv * g.head_dim
            bounds = (0, q_rows, q_rows + kv_rows, q_rows + 2 * kv_rows)
            if src.shape[0] != bounds[-1]:
                raise ConvertError(f"{gguf.parts[0]}: {name} has {src.shape[0]} rows, expected {bounds[-1]}")
            for (ours, _), a, b in zip(targets, bounds, bounds[1:]):
                out[ours] = T.slice_rows(src, a, b)
    return out


def importance_inverse(name: str, g: Geometry) -> list[tuple[str, callable]]:
    """For an imatrix entry (GGUF weight name): our weight name(s) and the map of its input columns
    into our order (only out_proj's V columns move)."""
    out = []
    for ours, rule in target_names(name, g):
        if rule is not None and "v_cols" in rule.undo and g.k_heads != g.v_heads:
            perm = _v_perm(g, g.v_dim)
            out.append((ours, lambda x, perm=perm: x[..., perm]))
        else:
            out.append((ours, lambda x: x))
    return out
