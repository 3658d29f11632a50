"""Load a Qwen3.5 checkpoint directory (HF as published, or MLX shards, quantised or not)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import layout
from .config import ModelConfig, ModelLoadError
from .qwen3_5 import Model, keeps_float32, sanitize

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def _resolve_dtype(name, config: ModelConfig, weights: dict):
    if name is not None:
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
        return DTYPES[name]
    if mx.default_device() == mx.cpu:
        # MLX's CPU backend emulates 16-bit float arithmetic: float32 is several times faster.
        return mx.float32
    if config.torch_dtype in DTYPES:
        return DTYPES[config.torch_dtype]
    embed = next((v for k, v in weights.items() if k.endswith("embed_tokens.weight")), None)
    if embed is not None and embed.dtype in DTYPES.values():
        return embed.dtype
    return mx.bfloat16


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """All tensors of a checkpoint directory, with the file each came from."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files found")
    weights, origin = {}, {}
    for f in files:
        if not f.exists():
            raise ModelLoadError(f"{f}: listed in {index.name} but missing")
        try:
            tensors = mx.load(str(f))
        except Exception as e:  # mlx raises plain RuntimeError/ValueError for unreadable files
            raise ModelLoadError(f"{f}: cannot read safetensors file ({e})") from None
        for k, v in tensors.items():
            weights[k] = v
            origin[k] = f.name
    return weights, origin


def _quantize(model: Model, config: ModelConfig, weights: dict) -> None:
    q = config.quantization
    if not q:
        return

    def predicate(path, module):
        if path in q:
            return q[path]
        return hasattr(module, "to_quantized") and f"{path}.scales" in weights

    nn.quantize(
        model,
        group_size=q.get("group_size", 64),
        bits=q["bits"],
        mode=q.get("mode", "affine"),
        class_predicate=predicate,
    )


def check_weights(model: Model, shapes: Mapping[str, Sequence[int]], where: str | Path,
                  name: Callable[[str], str] = repr) -> None:
    """The checkpoint's tensors (our name -> shape) are exactly `model`'s parameters, shapes included.
    The first mismatch raises ModelLoadError, prefixed by `where`; `name(key)` says which tensor."""
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    missing = [k for k in expected if k not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{where}: the checkpoint lacks tensor {missing[0]!r}{more}")
    for k, shape in shapes.items():
        if k not in expected:
            raise ModelLoadError(f"{where}: unexpected tensor {name(k)} for this config")
        if tuple(shape) != expected[k]:
            raise ModelLoadError(f"{where}: tensor {name(k)} has shape {tuple(shape)}, expected {expected[k]}")


def load_model(path, dtype: str | None = None, mtp: bool = True,
               prepare: Callable[[Model, dict], dict] | None = None) -> Model:
    """`mtp`: load the multi-token-prediction head (`model.mtp`) when config.json declares one
    (mtp_num_hidden_layers) and the checkpoint holds its tensors (mlx-lm's conversions keep the
    declaration but drop the tensors).
    `prepare(model, weights)`, given the new model and the checkpoint's lazily read tensors under our
    names, may replace modules and returns the tensors to load: model/parallel.py keeps one rank's
    part, so only that part is ever read from disk."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a model directory")
    config = ModelConfig.from_file(path / "config.json")
    raw, origin = read_safetensors(path)
    if mtp and config.mtp_num_hidden_layers:
        config.mtp_num_hidden_layers = layout.mtp_layers(raw)
    else:
        config.mtp_num_hidden_layers = 0
    try:
        weights, sources = sanitize(raw, config)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    del raw  # `weights` holds the only references: a tensor `prepare` drops is freed once used
    compute = _resolve_dtype(dtype, config, weights)

    model = Model(config)
    model.compute_dtype = compute
    if prepare is not None:
        weights = prepare(model, weights)
    _quantize(model, config, weights)
    check_weights(model, {k: v.shape for k, v in weights.items()}, path,
                  lambda k: f"{sources[k][0]!r} in {origin[sources[k][0]]}")
    cast = {}
    for k, v in weights.items():
        if not mx.issubdtype(v.dtype, mx.floating):
            cast[k] = v
        elif keeps_float32(k):
            cast[k] = v.astype(mx.float32)
        else:
            cast[k] = v.astype(compute)
    model.load_weights(list(cast.items()), strict=True)
    mx.eval(model.parameters())
    model.eval()
    return model


def load_tokenizer(path):
    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelLoadError(f"{path}: no tokenizer.json or tokenizer_config.json")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load(path, dtype: str | None = None):
    """`model, tokenizer = load(path)` in the style of mlx-lm."""
    return load_model(path, dtype), load_tokenizer(path)
