"""An importance matrix for the demo model computed from corpus conversations, in llama.cpp's
GGUF imatrix layout: per weight (GGUF name), the sum of squared input activations per input column
(`in_sum2` [n_mat, ne0], per expert for the stacked expert tensors) and the rows seen (`counts`).

Activations come from transformers' Qwen3_5MoeForCausalLM (fp32) through forward hooks; input
columns are in the GGUF's order (ssm_out's V columns tiled, as convert/gguf_writer writes them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LINEARS = {  # HF module suffix -> GGUF tensor name after blk.N.
    "linear_attn.in_proj_qkv": "attn_qkv", "linear_attn.in_proj_z": "attn_gate",
    "linear_attn.in_proj_a": "ssm_alpha", "linear_attn.in_proj_b": "ssm_beta", "linear_attn.out_proj": "ssm_out",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}


class _Accumulator:
    def __init__(self):
        self.sum2: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def add(self, name: str, x, n_mat: int = 1, mat: int = 0) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        if name not in self.sum2:
            self.sum2[name] = np.zeros((n_mat, x.shape[-1]), np.float64)
            self.counts[name] = np.zeros(n_mat, np.float64)
        self.sum2[name][mat] += (x * x).sum(0).double().numpy()
        self.counts[name][mat] += x.shape[0]


def compute_imatrix(hf_dir: Path, samples, out_path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3_5MoeForCausalLM

    from convert.gguf_writer import _grouped_to_tiled
    from convert.imatrix import Entry, write_gguf

    from . import corpus

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = Qwen3_5MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg = model.config
    acc = _Accumulator()
    hooks = []

    def linear_hook(name):
        return lambda module, args, output: acc.add(name, args[0])

    def experts_hook(bid):
        def hook(module, args, output):
            hidden, top_k_index = args[0], args[1]
            for e in range(module.num_experts):
                rows = (top_k_index == e).any(-1)
                x = hidden[rows]
                if x.shape[0] == 0:
                    x = hidden[:0]
                acc.add(f"blk.{bid}.ffn_gate_exps.weight", x, module.num_experts, e)
                acc.add(f"blk.{bid}.ffn_up_exps.weight", x, module.num_experts, e)
                gate, up = torch.nn.functional.linear(x, module.gate_up_proj[e]).chunk(2, dim=-1)
                acc.add(f"blk.{bid}.ffn_down_exps.weight", module.act_fn(gate) * up, module.num_experts, e)
        return hook

    for name, module in model.named_modules():
        parts = name.split(".")
        if name == "lm_head":
            hooks.append(module.register_forward_hook(linear_hook("output.weight")))
        if len(parts) < 4 or parts[:2] != ["model", "layers"]:
            continue
        bid, rest = int(parts[2]), ".".join(parts[3:])
        if rest in LINEARS:
            hooks.append(module.register_forward_hook(linear_hook(f"blk.{bid}.{LINEARS[rest]}.weight")))
        elif rest == "mlp.experts":
            hooks.append(module.register_forward_hook(experts_hook(bid)))
    try:
        with torch.no_grad():
            for s in samples:
                ids = tok.encode(corpus.render_sample(s), add_special_tokens=False)
                model(torch.tensor([ids]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()

    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    entries = {}
    for name, sum2 in acc.sum2.items():
        if name.endswith(".ssm_out.weight") and hk != hv:
            sum2 = _grouped_to_tiled(sum2, 1, hk, hv // hk, cfg.linear_value_head_dim)
        entries[name] = Entry(sum2, acc.counts[name])
    write_gguf(out_path, entries, chunks=len(samples), datasets=("deltaserve demo corpus (train split)",))
    return Path(out_path)
