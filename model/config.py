"""Qwen3.5 text-model configuration read from a Hugging Face or MLX config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5", "qwen3_5_text")
LAYER_TYPES = ("linear_attention", "full_attention")


class ModelLoadError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor at fault."""


def periodic_layer_types(n_layers: int, interval: int) -> list[str]:
    """Full attention at every interval-th layer (layer i when (i + 1) % interval == 0)."""
    return ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]


def full_attention_interval(layer_types: list[str]) -> int | None:
    """The interval whose periodic pattern is exactly `layer_types`, None if there is none.
    mlx-lm builds its layers from the interval alone, so a config must carry this one."""
    if "full_attention" not in layer_types:
        return None
    interval = layer_types.index("full_attention") + 1
    return interval if periodic_layer_types(len(layer_types), interval) == list(layer_types) else None


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: list[str]
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000_000.0
    partial_rotary_factor: float = 0.25
    intermediate_size: int = 0
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 262_144
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    quantization: dict | None = None
    mtp_num_hidden_layers: int = 0  # MTP layers (GGUF: nextn_predict_layers); 0 when the weights are absent

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"{source}: unsupported model_type {model_type!r}; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        text = dict(raw.get("text_config") or raw)
        # A wrapper config (model_type qwen3_5_moe with text_config) keeps some keys at top level.
        for key in ("tie_word_embeddings", "quantization", "quantization_config", "eos_token_id"):
            if key not in text and key in raw:
                text[key] = raw[key]

        def need(key):
            if key not in text:
                raise ModelLoadError(f"{source}: missing required key {key!r}")
            return text[key]

        n_layers = int(need("num_hidden_layers"))
        layer_types = text.get("layer_types")
        if layer_types is None:
            layer_types = periodic_layer_types(n_layers, int(text.get("full_attention_interval", 4)))
        if len(layer_types) != n_layers or any(t not in LAYER_TYPES for t in layer_types):
            raise ModelLoadError(
                f"{source}: layer_types must list {n_layers} entries from {LAYER_TYPES}, got {layer_types}"
            )
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", text.get("rope_theta", 10_000_000.0))
        partial = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
        n_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        eos = text.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        quant = text.get("quantization") or text.get("quantization_config")
        cfg = cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=int(text.get("num_key_value_heads", n_heads)),
            head_dim=int(text.get("head_dim") or hidden // n_heads),
            layer_types=list(layer_types),
            linear_num_key_heads=int(need("linear_num_key_heads")),
            linear_num_value_heads=int(need("linear_num_value_heads")),
            linear_key_head_dim=int(need("linear_key_head_dim")),
            linear_value_head_dim=int(need("linear_value_head_dim")),
            linear_conv_kernel_dim=int(text.get("linear_conv_kernel_dim", 4)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            partial_rotary_factor=float(partial),
            intermediate_size=int(text.get("intermediate_size") or 0),
            num_experts=int(text.get("num_experts") or 0),
            num_experts_per_tok=int(text.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(text.get("moe_intermediate_size") or 0),
            shared_expert_intermediate_size=int(text.get("shared_expert_intermediate_size") or 0),
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            max_position_embeddings=int(text.get("max_position_embeddings", 262_144)),
            eos_token_id=eos,
            torch_dtype=text.get("dtype") or text.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype"),
            quantization=quant if quant and "bits" in quant else None,
            mtp_num_hidden_layers=int(text.get("mtp_num_hidden_layers") or 0),
        )
        cfg._validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ModelLoadError(f"{path}: not found (a model directory needs a config.json)") from None
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, source=str(path))

    def _validate(self, source: str) -> None:
        problems = []
        if self.linear_num_value_heads % self.linear_num_key_heads:
            problems.append("linear_num_value_heads must be a multiple of linear_num_key_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.is_moe and not (0 < self.num_experts_per_tok <= self.num_experts):
            problems.append("num_experts_per_tok must be in 1..num_experts")
        if self.is_moe and self.moe_intermediate_size <= 0:
            problems.append("moe_intermediate_size must be positive for an MoE model")
        if not self.is_moe and self.intermediate_size <= 0:
            problems.append("intermediate_size must be positive for a dense model")
        if self.mtp_num_hidden_layers < 0:
            problems.append("mtp_num_hidden_layers must not be negative")
        if self.rotary_dims % 2 or self.rotary_dims > self.head_dim:
            problems.append("head_dim * partial_rotary_factor must be even and at most head_dim")
        if problems:
            raise ModelLoadError(f"{source}: " + "; ".join(problems))
