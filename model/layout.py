"""How a Qwen3.5 checkpoint may be laid out, and which of our parameters each tensor becomes.

Accepted: as Qwen publishes it (`model.language_model.` prefix, fused `experts.gate_up_proj`, vision
and `mtp.*` weights), as transformers saves it (`model.` prefix, fused or per-expert tensors), and
our own / mlx-lm's layout. A raw (HF) checkpoint is recognised in one place, `is_raw`: its conv1d
weight is [C, 1, K] where ours is [C, K, 1]. Only a raw checkpoint's conv1d is transposed and its
zero-centred norms given their +1, so a plan of our own layout changes nothing.

`plan` reads names and shapes only: the loader (MLX arrays, `qwen3_5.sanitize`) and the converter
(memory-mapped lazy tensors, `convert.hf_reader`) carry out the same steps on their own tensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import ModelLoadError

ZERO_CENTRED_NORMS = (  # stored as w in HF checkpoints, applied as (1 + w): we hold 1 + w
    ".input_layernorm.weight",
    ".post_attention_layernorm.weight",
    "model.norm.weight",
    ".q_norm.weight",
    ".k_norm.weight",
)
_VISION_PREFIXES = ("model.visual.", "visual.", "vision_tower.", "model.vision_tower.", "model.multi_modal_projector.")
_MTP_PREFIXES = ("mtp.", "model.mtp.")
_MTP_LAYER = re.compile(r"^(?:model\.)?mtp\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^(?P<p>.*\.mlp)\.experts\.(?P<e>\d+)\.(?P<w>gate_proj|up_proj|down_proj)\.weight$")

# What a Step does to its source tensors:
#   take       the one source as it is
#   stack      per-expert sources -> [E, ...]
#   gate_half  fused gate_up_proj [E, 2I, H] -> [E, :I, H]
#   up_half    fused gate_up_proj [E, 2I, H] -> [E, I:, H]
#   conv       [C, 1, K] -> [C, K, 1]
#   plus_one   1 + w, in float32
OPS = ("take", "stack", "gate_half", "up_half", "conv", "plus_one")


@dataclass(frozen=True)
class Step:
    op: str
    sources: tuple[str, ...]  # checkpoint keys, as the checkpoint names them


def canonical_key(key: str, keep_mtp: bool = False) -> str | None:
    """Our module path for a checkpoint key. None for weights we do not load: vision, and the MTP
    block unless keep_mtp (then named mtp.*, as the converter writes it for speculative decoding)."""
    if key.startswith(_VISION_PREFIXES):
        return None
    if key.startswith(_MTP_PREFIXES):
        return key.removeprefix("model.") if keep_mtp else None
    if key.startswith("model.language_model."):
        return "language_model.model." + key[len("model.language_model.") :]
    if key.startswith("language_model."):
        return key
    if key.startswith(("model.", "lm_head.")):
        return "language_model." + key
    return key


def mtp_layers(keys) -> int:
    """How many MTP decoder layers a checkpoint's tensors hold (mtp.layers.N.*, any layout); 0 if none."""
    found = {m[1] for k in keys if (m := _MTP_LAYER.match(k))}
    return len(found)


def zero_centred(name: str) -> bool:
    """Whether a norm weight (our name) is applied as (1 + w)."""
    if name.startswith("mtp."):  # the MTP block is full attention: every norm in it is (1 + w)
        return name.endswith(("norm.weight", "norm_embedding.weight", "norm_hidden.weight"))
    return name.endswith(ZERO_CENTRED_NORMS)


def is_raw(shapes: Mapping[str, Sequence[int]]) -> bool:
    return any(k.endswith("conv1d.weight") and len(s) == 3 and s[-1] != 1 for k, s in shapes.items())


def plan(shapes: Mapping[str, Sequence[int]], tie_word_embeddings: bool, keep_mtp: bool = False) -> dict[str, Step]:
    """Our parameter name -> the Step that makes it from the checkpoint's tensors (name -> shape)."""
    ours = {}
    for key in shapes:
        name = canonical_key(key, keep_mtp)
        if name is not None:
            ours[name] = key
    raw = is_raw({name: shapes[key] for name, key in ours.items()})

    steps: dict[str, Step] = {}
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for name, key in ours.items():
        ndim = len(shapes[key])
        if m := _EXPERT.match(name):
            experts.setdefault((m["p"], m["w"]), {})[int(m["e"])] = key
        elif name.endswith(".mlp.experts.gate_up_proj"):
            p = name.removesuffix(".experts.gate_up_proj")
            steps[f"{p}.switch_mlp.gate_proj.weight"] = Step("gate_half", (key,))
            steps[f"{p}.switch_mlp.up_proj.weight"] = Step("up_half", (key,))
        elif name.endswith(".mlp.experts.down_proj"):
            steps[name.removesuffix(".experts.down_proj") + ".switch_mlp.down_proj.weight"] = Step("take", (key,))
        elif raw and name.endswith("conv1d.weight") and ndim == 3:
            steps[name] = Step("conv", (key,))
        elif raw and ndim == 1 and zero_centred(name):
            steps[name] = Step("plus_one", (key,))
        else:
            steps[name] = Step("take", (key,))
    for (p, w), per in experts.items():
        n = max(per) + 1
        missing = [e for e in range(n) if e not in per]
        if missing:
            raise ModelLoadError(f"the checkpoint has per-expert tensors for {p} but lacks expert {missing[0]} ({w})")
        steps[f"{p}.switch_mlp.{w}.weight"] = Step("stack", tuple(per[e] for e in range(n)))
    if tie_word_embeddings:
        steps.pop("language_model.lm_head.weight", None)
    return steps
