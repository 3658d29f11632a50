"""Check a converted directory against a reference (the source GGUF / HF checkpoint, or another
unquantised MLX directory).

structural: per tensor class, the cosine between each dequantised output tensor (AWQ scaling
undone) and the reference tensor. functional: mean KL divergence KL(ref || ours) of the next-token
distributions and top-1 agreement over the tokens of a text file."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import ConvertError
from .hf_reader import SafetensorsFile
from .report import tensor_class
from .source import open_source

CHUNK_ELEMENTS = 16 * 2**20


@dataclass
class ClassCosine:
    name: str
    tensors: int
    min_cos: float
    mean_cos: float
    worst: str


@dataclass
class Functional:
    positions: int
    mean_kld: float
    top1: float


class OutputDir:
    """Raw tensors of a converted directory, dequantised on request, row chunk by row chunk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.config = json.loads((self.path / "config.json").read_text())
            index = json.loads((self.path / "model.safetensors.index.json").read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ConvertError(f"{path}: not a converted directory ({e})") from None
        self.quant = self.config.get("quantization") or {}
        self.files = {name: _RawFile(self.path / name) for name in sorted(set(index.values()))}
        self.where = {k: self.files[f] for k, f in index.items()}

    def params(self) -> list[str]:
        return [k for k in self.where if not k.endswith((".scales", ".biases"))]

    def shape(self, name: str) -> tuple[int, ...]:
        module = name.removesuffix(".weight")
        w = self.where[name].info(name)["shape"]
        if f"{module}.scales" not in self.where:
            return tuple(w)
        spec = self.spec(module)
        return (*w[:-1], w[-1] * 32 // spec[1])

    def spec(self, module: str) -> tuple[int, int]:
        entry = self.quant.get(module) if isinstance(self.quant.get(module), dict) else self.quant
        return int(entry["group_size"]), int(entry["bits"])

    def rows(self, name: str, a: int, b: int) -> np.ndarray:
        module = name.removesuffix(".weight")
        w = self.where[name].array(name)[a:b]
        if f"{module}.scales" not in self.where:
            return _float(w, self.where[name].info(name)["dtype"])
        group, bits = self.spec(module)
        dtype = self.where[f"{module}.scales"].info(f"{module}.scales")["dtype"]
        s = _mx(self.where[f"{module}.scales"].array(f"{module}.scales")[a:b], dtype)
        z = _mx(self.where[f"{module}.biases"].array(f"{module}.biases")[a:b], dtype)
        out = mx.dequantize(mx.array(np.ascontiguousarray(w)), s, z, group_size=group, bits=bits)
        return np.array(out.astype(mx.float32))


class _RawFile(SafetensorsFile):
    """SafetensorsFile that also hands out U32 (packed) tensors as raw numpy arrays."""

    _NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32}

    def info(self, key):
        return self.header[key]

    def array(self, key) -> np.ndarray:
        info = self.header[key]
        a, b = info["data_offsets"]
        dtype = self._NP[info["dtype"]]
        return np.frombuffer(self._mm, dtype, count=(b - a) // np.dtype(dtype).itemsize,
                             offset=self.data_start + a).reshape(info["shape"])


def _float(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)


def _mx(x: np.ndarray, dtype: str) -> mx.array:
    a = mx.array(np.ascontiguousarray(x))
    return a.view(mx.bfloat16) if dtype == "BF16" else a


def _awq_undo(path: Path) -> tuple[dict, dict]:
    """(col_div, row_mul): to undo AWQ, divide consumers' columns and multiply producers by s."""
    f = path / "awq_scales.safetensors"
    if not f.exists():
        return {}, {}
    st = _RawFile(f)
    col, row = {}, {}
    for g in json.loads(st.metadata["groups"]):
        s = st.array(g["name"]).astype(np.float32)
        row[g["producer"]] = s
        for c in g["consumers"]:
            col[c] = s
    return col, row


def structural(output_dir, reference, threshold: float = 0.995) -> list[ClassCosine]:
    out = OutputDir(output_dir)
    col_div, row_mul = _awq_undo(out.path)
    ref = open_source(reference)
    per_class: dict[str, list[tuple[float, str]]] = defaultdict(list)
    try:
        for name, t in ref.tensors.items():
            if name not in out.where:
                raise ConvertError(f"{output_dir}: lacks {name}, which the reference has")
            if out.shape(name) != tuple(t.shape):
                raise ConvertError(f"{output_dir}: {name} has shape {out.shape(name)}, reference {t.shape}")
            per_class[tensor_class(name)].append((_cosine(out, name, t, col_div, row_mul), name))
            t.release()
    finally:
        ref.close()
    results = []
    for cls, values in per_class.items():
        cos = [c for c, _ in values]
        worst = min(values)
        results.append(ClassCosine(cls, len(values), float(min(cos)), float(np.mean(cos)), worst[1]))
    return sorted(results, key=lambda r: r.min_cos)


def _cosine(out: OutputDir, name: str, t, col_div, row_mul) -> float:
    n = t.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, t.numel // n))
    dot = na = nb = 0.0
    for a in range(0, n, step):
        b = min(n, a + step)
        x = out.rows(name, a, b).astype(np.float64)
        s = col_div.get(name)
        if s is not None:
            x = x / (s[a:b, None, :] if s.ndim == 2 else s)
        s = row_mul.get(name)
        if s is not None:
            x = x * (s[a:b] if x.ndim == 1 else s[a:b, :, None] if s.ndim == 2 else s[a:b, None])
        y = np.array(t.rows(a, b).astype(mx.float32)).astype(np.float64)
        dot += float((x * y).sum())
        na += float((x * x).sum())
        nb += float((y * y).sum())
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return dot / np.sqrt(na * nb)


def functional(output_dir, reference, text: str, max_tokens: int = 512, context: int = 256) -> Functional:
    from model import load_model

    ids = _tokenizer(str(Path(output_dir) / "tokenizer.json"), _mtime(Path(output_dir) / "tokenizer.json")) \
        .encode(text, add_special_tokens=False)[:max_tokens]
    if len(ids) < 2:
        raise ConvertError("the text file gives fewer than 2 tokens")
    with tempfile.TemporaryDirectory(prefix="deltaserve-validate-") as tmp:
        ref_dir = Path(reference)
        if not ref_dir.is_dir():  # a GGUF: its float32 conversion is the reference model
            from .pipeline import convert

            ref_dir = convert(reference, Path(tmp) / "reference", dtype="float32", progress=False)
        ref_model = load_model(ref_dir, dtype="float32")
        ours = _float_vocab_layers(load_model(output_dir, dtype="float32"))
        klds, agree = [], []
        for a in range(0, len(ids), context):
            window = mx.array(ids[a:a + context])[None]
            kl, same = position_divergence(_log_softmax(ref_model(window))[0], _log_softmax(ours(window))[0])
            klds.append(kl)
            agree.append(same)
    kld, top = np.concatenate(klds), np.concatenate(agree)
    return Functional(int(kld.size), float(kld.mean()), float(top.mean()))


def position_divergence(ref_logp: mx.array, logp: mx.array) -> tuple[np.ndarray, np.ndarray]:
    """Per position of two log-softmax rows [T, V]: KL(reference || ours) of the next-token distributions,
    and whether the most likely token is the same."""
    kl = mx.sum(mx.exp(ref_logp) * (ref_logp - logp), axis=-1)
    return np.array(kl), np.array(mx.argmax(ref_logp, -1) == mx.argmax(logp, -1))


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns if path.exists() else 0


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str, mtime: int):
    from model.loader import load_tokenizer

    return load_tokenizer(Path(tokenizer_json).parent)


def _float_vocab_layers(model):
    """On the CPU backend, MLX's quantised matmul is slow, and the vocabulary projection dominates
    small models: hold the (dequantised) embedding and lm_head in float32 there. Same weights."""
    if mx.default_device() != mx.cpu:
        return model
    lm = model.language_model
    for parent, attr in ((lm.model, "embed_tokens"), (lm, "lm_head")):
        layer = getattr(parent, attr, None)
        if layer is None or not hasattr(layer, "scales"):
            continue
        w = mx.dequantize(layer.weight, layer.scales, layer.get("biases"), group_size=layer.group_size,
                          bits=layer.bits).astype(mx.float32)
        dense = nn.Embedding(*w.shape) if attr == "embed_tokens" else nn.Linear(w.shape[1], w.shape[0], bias=False)
        dense.weight = w
        setattr(parent, attr, dense)
    return model


def _log_softmax(logits: mx.array) -> mx.array:
    x = logits.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def render_structural(results: list[ClassCosine], threshold: float) -> str:
    lines = [f"{'tensor class':40s} {'tensors':>7s} {'min cos':>9s} {'mean cos':>9s}  worst"]
    for r in results:
        flag = "  BELOW THRESHOLD" if r.min_cos < threshold else ""
        lines.append(f"{r.name:40s} {r.tensors:7d} {r.min_cos:9.5f} {r.mean_cos:9.5f}  {r.worst}{flag}")
    return "\n".join(lines)
