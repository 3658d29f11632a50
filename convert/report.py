"""The conversion report: per tensor class its bits, group size and bytes, and the total against BF16."""

from __future__ import annotations

from collections import defaultdict

from .plan import Item

_CLASSES = (  # (suffix of the parameter name, class), first match wins
    ("embed_tokens.weight", "embed_tokens"),
    ("lm_head.weight", "lm_head"),
    ("self_attn.q_proj.weight", "attention q/k/v"),
    ("self_attn.k_proj.weight", "attention q/k/v"),
    ("self_attn.v_proj.weight", "attention q/k/v"),
    ("self_attn.o_proj.weight", "attention o_proj"),
    ("linear_attn.in_proj_qkv.weight", "linear-attention in_proj_qkv/z"),
    ("linear_attn.in_proj_z.weight", "linear-attention in_proj_qkv/z"),
    ("linear_attn.in_proj_a.weight", "linear-attention in_proj_a/b"),
    ("linear_attn.in_proj_b.weight", "linear-attention in_proj_a/b"),
    ("linear_attn.out_proj.weight", "linear-attention out_proj"),
    ("linear_attn.conv1d.weight", "linear-attention conv1d/A_log/dt_bias"),
    ("linear_attn.A_log", "linear-attention conv1d/A_log/dt_bias"),
    ("linear_attn.dt_bias", "linear-attention conv1d/A_log/dt_bias"),
    ("mlp.gate.weight", "router"),
    ("mlp.shared_expert_gate.weight", "shared_expert_gate"),
    ("switch_mlp.gate_proj.weight", "experts gate/up"),
    ("switch_mlp.up_proj.weight", "experts gate/up"),
    ("switch_mlp.down_proj.weight", "experts down"),
    ("shared_expert.gate_proj.weight", "shared expert gate/up"),
    ("shared_expert.up_proj.weight", "shared expert gate/up"),
    ("shared_expert.down_proj.weight", "shared expert down"),
    ("mlp.gate_proj.weight", "mlp gate/up"),
    ("mlp.up_proj.weight", "mlp gate/up"),
    ("mlp.down_proj.weight", "mlp down"),
    ("mtp.fc.weight", "fc"),
)


def tensor_class(name: str) -> str:
    prefix = "mtp " if name.startswith("mtp.") else ""
    for suffix, cls in _CLASSES:
        if name.endswith(suffix):
            return prefix + cls
    if name.endswith("norm.weight") or "norm" in name.rsplit(".", 2)[-2]:
        return prefix + "norms"
    return prefix + "other"


def summarise(items: list[Item]) -> dict:
    rows: dict[tuple, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    for item in items:
        spec = item.spec
        key = (tensor_class(item.name), spec.bits if spec else item.dtype, spec.group_size if spec else None)
        row = rows[key]
        row["tensors"] += 1
        row["params"] += item.tensor.numel
        row["bytes"] += item.nbytes
    out = [{"class": c, "bits": b, "group_size": g, **v} for (c, b, g), v in rows.items()]
    out.sort(key=lambda r: -r["bytes"])
    total = sum(r["bytes"] for r in out)
    params = sum(r["params"] for r in out)
    return {"rows": out, "total_bytes": total, "params": params, "bf16_bytes": 2 * params,
            "bits_per_weight": 8 * total / params if params else 0.0}


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def render(summary: dict, header: list[tuple[str, str]], warnings: list[str]) -> str:
    lines = ["# deltaserve conversion report", ""]
    lines += [f"- {k}: {v}" for k, v in header]
    lines += ["", "| tensor class | bits | group | tensors | parameters | bytes |", "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        group = r["group_size"] if r["group_size"] else "-"
        lines.append(f"| {r['class']} | {r['bits']} | {group} | {r['tensors']} | {r['params']:,} | {r['bytes']:,} |")
    total, bf16 = summary["total_bytes"], summary["bf16_bytes"]
    lines += ["", f"Total: {total:,} bytes ({_gb(total)}), {summary['bits_per_weight']:.2f} bits per weight; "
                  f"BF16: {bf16:,} bytes ({_gb(bf16)}); ratio {total / bf16 if bf16 else 0:.3f}"]
    if warnings:
        lines += ["", "Warnings:"] + [f"- {w}" for w in warnings]
    return "\n".join(lines) + "\n"
