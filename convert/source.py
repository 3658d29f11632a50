"""Open a conversion input (GGUF file or HF directory) as: config + lazy tensors in our layout."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from model import layout
from model.config import ModelConfig, ModelLoadError
from model.loader import check_weights
from model.qwen3_5 import Model

from .errors import ConvertError
from .gguf_inverse import Geometry, gguf_tensors
from .gguf_reader import GGUFFile, find_parts, text_config
from .hf_reader import HFCheckpoint
from .tensor import LazyTensor
from .tokenizer import copy_hf_tokenizer, write_gguf_tokenizer


@dataclass
class Source:
    kind: str  # "gguf" | "hf"
    path: Path
    config: dict  # flat HF-style text config
    tensors: dict[str, LazyTensor]  # our names, in output order
    identity: list[tuple[str, int, int]]  # (path, size, mtime_ns) of every input file
    types: list[str]  # tensor types in the input
    tokenizer: Callable[[Path], dict]  # writes tokenizer files into a directory; returns special ids
    close: Callable[[], None] = field(default=lambda: None)
    warnings: list[str] = field(default_factory=list)

    @property
    def geometry(self) -> Geometry:
        return Geometry.from_config(self.config)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def natural_key(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.]", name)]


def _order(name: str):
    """Embeddings, layers in order, final norm, head, then the MTP block."""
    rank = 2
    if name.startswith("language_model.model.embed_tokens"):
        rank = 0
    elif name.startswith("language_model.model.layers."):
        rank = 1
    elif name.startswith("mtp."):
        rank = 3
    return (rank, natural_key(name))


def open_source(path) -> Source:
    path = Path(path)
    if path.is_dir():
        source = _open_hf(path)
    elif path.is_file():
        source = _open_gguf(path)
    else:
        raise ConvertError(f"{path}: no such file or directory")
    try:
        _check_against_model(source)
    except BaseException:
        source.close()
        raise
    source.tensors = dict(sorted(source.tensors.items(), key=lambda kv: _order(kv[0])))
    return source


def _open_gguf(path: Path) -> Source:
    g = GGUFFile(path)
    try:
        config = text_config(g)
        tensors = gguf_tensors(g, Geometry.from_config(config))
    except BaseException:
        g.close()
        raise
    warnings = []
    quantized = g.quantized_types()
    if quantized:
        warnings.append(
            f"the source is already quantised ({', '.join(quantized)}): re-quantising compounds its "
            "error; convert from the BF16 GGUF where you can")
    types = sorted({t.source_dtype for t in tensors.values()})
    digest = g.header.digest("tokenizer.")

    def tokenizer(out: Path) -> dict:
        return write_gguf_tokenizer(g.parts[0], out, digest)

    return Source("gguf", path, config, tensors, g.identity(), types, tokenizer, g.close, warnings)


def _open_hf(path: Path) -> Source:
    ckpt = HFCheckpoint(path)
    tensors = ckpt.tensors()

    def tokenizer(out: Path) -> dict:
        return copy_hf_tokenizer(path, out)

    return Source("hf", path, ckpt.config, tensors, ckpt.identity(), ckpt.source_types(), tokenizer)


def _check_against_model(source: Source) -> None:
    """The tensors are exactly what our model has for this config, the MTP head included; the
    config's mtp_num_hidden_layers is set to the MTP layers the tensors hold."""
    shapes = source.shapes()
    source.config["mtp_num_hidden_layers"] = layout.mtp_layers(shapes)
    try:
        model = Model(ModelConfig.from_dict(source.config, source=f"{source.path} (config)"))
        check_weights(model, shapes, source.path)
    except ModelLoadError as e:
        raise ConvertError(str(e)) from None


def input_identity(path) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file a conversion reads, without parsing any of them."""
    path = Path(path)
    if path.is_dir():
        files = [path / "config.json", *sorted(path.glob("*.safetensors")), path / "model.safetensors.index.json"]
        files += [path / n for n in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")]
        files = [f for f in files if f.is_file()]
        if not (path / "config.json").is_file():
            raise ConvertError(f"{path}: no config.json (not a checkpoint directory)")
    elif path.is_file():
        files = find_parts(path)
    else:
        raise ConvertError(f"{path}: no such file or directory")
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
