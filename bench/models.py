"""Benchmark checkpoints in mlx-lm's layout, so that deltaserve and mlx-lm load the same files.

- `wide`: Qwen3.5-35B-A3B layer widths (hidden 2048, 256 experts top-8 of 512, linear heads
  16/32 of 128, attention 16/2 heads of 256, vocab 248320) with only a few layers, random
  weights, 4-bit (router and shared-expert gate 8-bit, as mlx-lm quantises them): real kernel
  shapes at a size this machine can hold.
- `demo`: the embedded demo model (model/demo/deltaserve-demo.gguf) converted by our converter,
  uniform 4-bit (mlx-lm loads our output unchanged).
- `tiny`: the moe_r4 test fixture converted by mlx-lm (4-bit), for quick runs.
Built once under .cache/bench/.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"

WIDE = {
    "model_type": "qwen3_5_moe",
    "hidden_size": 2048,
    "num_hidden_layers": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "vocab_size": 248320,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 262144,
    "tie_word_embeddings": False,
    "full_attention_interval": 4,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
    "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                        "mrope_section": [11, 11, 10]},
    "eos_token_id": 248044,
}


def _router_predicate(path, _module):
    if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
        return {"group_size": 64, "bits": 8}
    return True


def build_wide(out: Path, layers: int = 4, bits: int = 4) -> Path:
    from mlx_lm.models.qwen3_5_moe import Model, ModelArgs
    from mlx_lm.utils import quantize_model, save_config, save_model

    config = dict(WIDE, num_hidden_layers=layers,
                  layer_types=[("full_attention" if (i + 1) % 4 == 0 else "linear_attention")
                               for i in range(layers)])
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    model.set_dtype(mx.bfloat16)
    for layer in model.language_model.model.layers:
        mx.eval(layer.parameters())  # one layer at a time keeps the fp32 init transient
    model, config = quantize_model(model, config, group_size=64, bits=bits, quant_predicate=_router_predicate)
    for layer in model.language_model.model.layers:
        mx.eval(layer.parameters())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(tmp, model)
    save_config(config, tmp / "config.json")
    tmp.rename(out)
    return out


def build_tiny(out: Path) -> Path:
    from fixtures import get_fixture
    from mlx_lm import convert

    from model.loader import read_safetensors

    fx = get_fixture("moe_r4")
    cfg = fx.config
    src = out.with_name(out.name + ".src")
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(fx.hf_dir, src)
    weights, _ = read_safetensors(src)
    for layer in range(cfg["num_hidden_layers"]):  # mlx-lm reads only transformers' fused expert layout
        p = f"model.layers.{layer}.mlp.experts"
        stack = {n: mx.stack([weights.pop(f"{p}.{e}.{n}.weight") for e in range(cfg["num_experts"])])
                 for n in ("gate_proj", "up_proj", "down_proj")}
        weights[f"{p}.gate_up_proj"] = mx.concatenate([stack["gate_proj"], stack["up_proj"]], axis=1)
        weights[f"{p}.down_proj"] = stack["down_proj"]
    for f in src.glob("*.safetensors*"):
        f.unlink()
    mx.save_safetensors(str(src / "model.safetensors"), weights, {"format": "pt"})
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_5_moe"}))
    convert(str(src), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32)
    shutil.rmtree(src)
    return out


def build_demo(out: Path) -> Path:
    from convert import convert
    from model.demo import DEMO_GGUF

    return convert(DEMO_GGUF, out, quantize=True, q_recipe="uniform", q_bits=4, progress=False)


def get(name: str) -> Path:
    path = CACHE / name
    if name == "demo":  # keyed by the GGUF, which a rebuild replaces
        from model.demo import DEMO_GGUF

        stat = DEMO_GGUF.stat()
        path = CACHE / f"demo-{stat.st_size}-{stat.st_mtime_ns}"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        {"wide": build_wide, "tiny": build_tiny, "demo": build_demo}[name](path)
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or ["demo", "wide"]:
        print(name, get(name))
