"""Continue training from a GGUF, and widen a trained model without changing what it computes.

`load_gguf` turns a qwen35moe GGUF (ours or llama.cpp's) back into transformers' `Qwen3_5MoeForCausalLM`:
the converter's inverse table gives our layout, and the few differences from transformers' own
(stacked gate/up experts fused back, conv1d [C, K, 1] -> [C, 1, K], zero-centred norms stored as w) are
undone here.

`widen` grows the hidden size and the number of full-attention heads. Every old weight keeps its place;
what reads the new residual dimensions starts random, what writes them (embeddings, attention and
GatedDeltaNet outputs, expert and shared-expert down projections) and the new heads' output columns
start at zero, so the new dimensions stay zero and the new heads silent until training moves them. The
only thing the zeros change is the RMS over the wider residual (by sqrt(old / new)), which the norms'
(1 + w) absorb. The widened model's logits equal the old ones (tested), and gradients reach every new
weight.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from .train import ModelShape

TEXT_PREFIX = "language_model."
# residual writers: [out, in] weights whose rows (or, stacked per expert, axis 1) are hidden dimensions
WRITERS = ("self_attn.o_proj.weight", "linear_attn.out_proj.weight", "mlp.experts.down_proj",
           "mlp.shared_expert.down_proj.weight")


def shape_of(config) -> ModelShape:
    """The ModelShape of a transformers text config, or of text_config's dict for a GGUF (which may lack
    max_position_embeddings: the default then)."""
    values = config if isinstance(config, dict) else config.to_dict()
    default = ModelShape.max_position_embeddings
    return ModelShape(**{k: values.get(k, default) if k == "max_position_embeddings" else values[k]
                         for k in ModelShape.__dataclass_fields__})


def load_gguf(path: Path, router_aux_loss_coef: float = 0.0):
    """A float32 Qwen3_5MoeForCausalLM holding a qwen35moe GGUF's weights, and its ModelShape."""
    import mlx.core as mx
    import numpy as np
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    from convert.gguf_inverse import Geometry, gguf_tensors
    from convert.gguf_reader import GGUFFile, text_config
    from model.layout import ZERO_CENTRED_NORMS

    from .train import model_config

    with GGUFFile(Path(path)) as g:
        hp = text_config(g)
        if not hp.get("num_experts"):
            raise ValueError(f"{path}: not a MoE model (the demo trains Qwen3_5MoeForCausalLM)")
        ours = {k: np.array(t.read().astype(mx.float32)) for k, t in gguf_tensors(g, Geometry.from_config(hp)).items()}
        eos = int(g.get("tokenizer.ggml.eos_token_id"))
        pad = int(g.get("tokenizer.ggml.padding_token_id", eos))
    shape = shape_of(hp)
    model = Qwen3_5MoeForCausalLM(model_config(shape, hp["vocab_size"], eos, pad, router_aux_loss_coef)).float()
    state = {}
    for name, x in ours.items():
        if not name.startswith(TEXT_PREFIX):
            continue  # an MTP head: the demo trains none
        name = name[len(TEXT_PREFIX):]
        if name.endswith("switch_mlp.up_proj.weight"):
            continue  # joined to gate_proj below
        if name.endswith("switch_mlp.gate_proj.weight"):
            up = ours[TEXT_PREFIX + name.replace("gate_proj", "up_proj")]
            state[name.replace("switch_mlp.gate_proj.weight", "experts.gate_up_proj")] = np.concatenate([x, up], axis=1)
        elif name.endswith("switch_mlp.down_proj.weight"):
            state[name.replace("switch_mlp.down_proj.weight", "experts.down_proj")] = x
        elif name.endswith("conv1d.weight"):
            state[name] = np.transpose(x, (0, 2, 1))  # [C, K, 1] -> [C, 1, K]
        elif name.endswith(ZERO_CENTRED_NORMS):
            state[name] = x - 1.0
        else:
            state[name] = x
    expected = model.state_dict()
    if set(state) != set(expected):
        raise ValueError(f"{path}: tensors do not match the model: missing {sorted(set(expected) - set(state))[:4]}, "
                         f"extra {sorted(set(state) - set(expected))[:4]}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)).reshape(expected[k].shape)
                           for k, v in state.items()}, strict=True)
    return model, shape


def widen(model, hidden_size: int, num_attention_heads: int, num_key_value_heads: int, seed: int = 0):
    """A new Qwen3_5MoeForCausalLM, `hidden_size` wide with that many full-attention heads, computing what
    `model` computes (module docstring). Heads keep their key/value groups: the query-per-key-head ratio
    may not change."""
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    from .train import model_config

    c = model.config
    old = shape_of(c)
    if hidden_size < old.hidden_size or num_attention_heads < old.num_attention_heads:
        raise ValueError("widen only grows: hidden size and heads must not shrink")
    if num_attention_heads * old.num_key_value_heads != num_key_value_heads * old.num_attention_heads:
        raise ValueError(f"{num_attention_heads} heads over {num_key_value_heads} key/value heads changes the "
                         f"grouping of {old.num_attention_heads} over {old.num_key_value_heads}")
    shape = replace(old, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                    num_key_value_heads=num_key_value_heads)
    torch.manual_seed(seed)
    new = Qwen3_5MoeForCausalLM(model_config(shape, c.vocab_size, c.eos_token_id, c.pad_token_id,
                                             c.router_aux_loss_coef)).float()
    norm_scale = math.sqrt(old.hidden_size / hidden_size)
    old_state = model.state_dict()
    with torch.no_grad():
        for name, p in new.state_dict().items():
            o = old_state[name].float()
            if name == "model.embed_tokens.weight" or name.endswith(WRITERS):
                p.zero_()  # new rows (residual dims) and o_proj's new head columns stay zero
            p[tuple(slice(0, n) for n in o.shape)] = o
            if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or name == "model.norm.weight":
                p.copy_((1.0 + p) * norm_scale - 1.0)  # the old dims' share of the RMS shrank by norm_scale
    return new
