"""HF checkpoint directories (and unquantised MLX ones): memory-mapped safetensors -> our layout.

Accepts the published layout (model.language_model. prefixes, fused experts.gate_up_proj, vision
weights, mtp.*), transformers 5's per-expert tensors, plain model. prefixes, and our own output.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from model.qwen3_5 import ZERO_CENTRED_NORMS, canonical_key

from . import tensor as T
from .errors import ConvertError
from .tensor import LazyTensor

MODEL_TYPES = {"qwen3_5_moe": "qwen3_5_moe", "qwen3_5_moe_text": "qwen3_5_moe",
               "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_EXPERT = re.compile(r"^(?P<p>.*\.mlp)\.experts\.(?P<e>\d+)\.(?P<w>gate_proj|up_proj|down_proj)\.weight$")
_PAGE = mmap.PAGESIZE


class SafetensorsFile:
    """Header of one .safetensors file plus a read-only mapping of its data."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._file = open(path, "rb")
            size = path.stat().st_size
            (n,) = struct.unpack("<Q", self._file.read(8))
            if n > size - 8:
                raise ValueError("header length past the end of the file")
            header = json.loads(self._file.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ConvertError(f"{path}: not a readable safetensors file ({e})") from None
        self.data_start = 8 + n
        self.metadata = header.get("__metadata__") or {}
        self.header = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in self.header.values()), default=0)
        if self.data_start + end > size:
            raise ConvertError(f"{path}: truncated (tensors need {self.data_start + end} bytes, file has {size})")
        self._mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def lazy(self, name: str) -> LazyTensor:
        info = self.header[name]
        dtype = info["dtype"]
        if dtype not in _DTYPES:
            raise ConvertError(f"{self.path}: tensor {name} has dtype {dtype}; expected F32, F16 or BF16 "
                               "(an already quantised checkpoint cannot be converted)")
        a, b = info["data_offsets"]
        shape = tuple(info["shape"])
        offset = self.data_start + a
        raw = np.frombuffer(self._mm, _DTYPES[dtype], count=(b - a) // np.dtype(_DTYPES[dtype]).itemsize,
                            offset=offset).reshape(shape)

        def take(index):
            x = mx.array(raw[index] if raw.ndim else raw)
            return x.view(mx.bfloat16) if dtype == "BF16" else x

        def release():
            start = offset - offset % _PAGE
            if b > a:
                self._mm.madvise(mmap.MADV_DONTNEED, start, offset + (b - a) - start)

        return LazyTensor(shape, take, dtype, b - a, release)


def read_hf_config(path: Path) -> dict:
    config_path = path / "config.json"
    try:
        raw = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path}: no config.json (not a checkpoint directory)") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{config_path}: not valid JSON ({e})") from None
    if raw.get("quantization") or raw.get("quantization_config"):
        raise ConvertError(f"{path}: already quantised; convert from the BF16 checkpoint instead")
    text = dict(raw.get("text_config") or raw)
    for key in ("tie_word_embeddings", "eos_token_id", "bos_token_id", "pad_token_id"):
        if key not in text and key in raw:
            text[key] = raw[key]
    model_type = text.get("model_type") or raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConvertError(f"{config_path}: unsupported model_type {model_type!r}; supported: "
                           f"{', '.join(MODEL_TYPES)}")
    text["model_type"] = MODEL_TYPES[model_type]
    n_layers = int(text["num_hidden_layers"])
    interval = int(text.get("full_attention_interval", 4))
    text.setdefault("layer_types", ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                                    for i in range(n_layers)])
    text.setdefault("full_attention_interval", interval)
    text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope.setdefault("rope_theta", text.get("rope_theta", 1e7))
    rope.setdefault("partial_rotary_factor", text.get("partial_rotary_factor", 0.25))
    text["rope_parameters"] = rope
    text.setdefault("tie_word_embeddings", False)
    return text


def _files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConvertError(f"{index}: not a safetensors index ({e})") from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ConvertError(f"{path}: {missing[0]} is listed in {index.name} but missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{path}: no *.safetensors weight files")
    return files


class HFCheckpoint:
    def __init__(self, path):
        self.path = Path(path)
        self.config = read_hf_config(self.path)
        self.files = [SafetensorsFile(f) for f in _files(self.path)]

    def identity(self) -> list[tuple[str, int, int]]:
        paths = [self.path / "config.json"] + [f.path for f in self.files]
        return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]

    def source_types(self) -> list[str]:
        return sorted({info["dtype"] for f in self.files for info in f.header.values()})

    def tensors(self) -> dict[str, LazyTensor]:
        raw: dict[str, LazyTensor] = {}
        for f in self.files:
            for key in f.header:
                name = canonical_key(key, keep_mtp=True)
                if name is not None:
                    raw[name] = f.lazy(key)
        return _to_our_layout(raw, self.path)


def _to_our_layout(raw: dict[str, LazyTensor], path: Path) -> dict[str, LazyTensor]:
    is_hf = any(k.endswith("conv1d.weight") and v.shape[-1] != 1 for k, v in raw.items())
    out: dict[str, LazyTensor] = {}
    experts: dict[tuple[str, str], dict[int, LazyTensor]] = {}
    for name, t in raw.items():
        m = _EXPERT.match(name)
        if m:
            experts.setdefault((m["p"], m["w"]), {})[int(m["e"])] = t
        elif name.endswith(".mlp.experts.gate_up_proj"):
            p = name[: -len(".experts.gate_up_proj")]
            half = t.shape[1] // 2
            out[f"{p}.switch_mlp.gate_proj.weight"] = T.slice_axis1(t, 0, half)
            out[f"{p}.switch_mlp.up_proj.weight"] = T.slice_axis1(t, half, 2 * half)
        elif name.endswith(".mlp.experts.down_proj"):
            out[name[: -len(".experts.down_proj")] + ".switch_mlp.down_proj.weight"] = t
        elif is_hf and name.endswith("conv1d.weight") and len(t.shape) == 3:
            out[name] = T.reshape(t, (t.shape[0], t.shape[2], 1))  # [C, 1, K] -> [C, K, 1]
        elif is_hf and len(t.shape) == 1 and _zero_centred(name):
            out[name] = T.map_values(t, lambda x: x.astype(mx.float32) + 1.0)
        else:
            out[name] = t
    for (p, w), per in experts.items():
        n = max(per) + 1
        if sorted(per) != list(range(n)):
            missing = next(e for e in range(n) if e not in per)
            raise ConvertError(f"{path}: per-expert tensors of {p} lack expert {missing} ({w})")
        out[f"{p}.switch_mlp.{w}.weight"] = T.stack([per[e] for e in range(n)])
    return out


def _zero_centred(name: str) -> bool:
    if name.startswith("mtp."):  # the MTP block is full attention: every norm in it is (1 + w)
        return name.endswith("norm.weight") or name.endswith(("norm_embedding.weight", "norm_hidden.weight"))
    return name.endswith(ZERO_CENTRED_NORMS)
