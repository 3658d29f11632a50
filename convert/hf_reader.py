"""HF checkpoint directories (and unquantised MLX ones): memory-mapped safetensors -> our layout,
by the rules of model/layout.py (which layouts are accepted and how each maps to ours)."""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import mlx.core as mx
import numpy as np

from model import layout
from model.config import ModelLoadError, periodic_layer_types

from . import tensor as T
from .errors import ConvertError
from .tensor import LazyTensor

MODEL_TYPES = {"qwen3_5_moe": "qwen3_5_moe", "qwen3_5_moe_text": "qwen3_5_moe",
               "qwen3_5": "qwen3_5", "qwen3_5_text": "qwen3_5"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
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
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
        if key not in text:
            raise ConvertError(f"{config_path}: missing required key {key!r}")
    if "layer_types" not in text:
        text["layer_types"] = periodic_layer_types(int(text["num_hidden_layers"]),
                                                   int(text.get("full_attention_interval", 4)))
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
        """Every tensor in our layout and names, the MTP block included."""
        file_of = {key: f for f in self.files for key in f.header}
        try:
            steps = layout.plan({k: f.header[k]["shape"] for k, f in file_of.items()},
                                self.config["tie_word_embeddings"], keep_mtp=True)
        except ModelLoadError as e:
            raise ConvertError(f"{self.path}: {e}") from None
        return {name: _APPLY[step.op]([file_of[k].lazy(k) for k in step.sources]) for name, step in steps.items()}


def _half(t: LazyTensor, i: int) -> LazyTensor:
    n = t.shape[1] // 2
    return T.slice_axis1(t, i * n, (i + 1) * n)


_APPLY = {  # layout.OPS on lazy tensors
    "take": lambda ts: ts[0],
    "stack": T.stack,
    "gate_half": lambda ts: _half(ts[0], 0),
    "up_half": lambda ts: _half(ts[0], 1),
    "conv": lambda ts: T.reshape(ts[0], (ts[0].shape[0], ts[0].shape[2], 1)),  # [C, 1, K] -> [C, K, 1]
    "plus_one": lambda ts: T.map_values(ts[0], lambda x: x.astype(mx.float32) + 1.0),
}
