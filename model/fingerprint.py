"""What makes two loaded models' states interchangeable: a small identity read from a checkpoint
directory without reading its weights, so that a prefix cache on disk is never restored into another
model and distributed ranks holding different files refuse to start.

The identity covers config.json's model fields, the quantisation, the compute dtype and, per weight
shard, its name, size, safetensors header (every tensor's name, dtype, shape and offsets) and a few
bytes sampled from each tensor's data (its start, middle and end). That is a few reads per tensor,
not the weights: milliseconds for a test model, about a second for a 228 GB one.

Not caught: a change to tensor data that leaves every sampled byte and the header alone (an edit to
a few weights in the middle of a tensor), and anything outside config.json and the shards (the
tokenizer and chat template decide which tokens come in, not what state a token sequence makes).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

# config.json keys that say how a file was made or how transformers should run it, not what the model is
_NOT_MODEL = {"transformers_version", "torch_dtype", "use_cache", "architectures", "auto_map"}
_QUANT_KEYS = ("quantization", "quantization_config")
_SAMPLE = 64  # bytes read at each of three places in each tensor's data
_MAX_HEADER = 100 << 20  # the safetensors format's own bound on its JSON header


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _shards(model_dir: Path) -> list[Path]:
    """The weight files model.loader reads: those an index names, or every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            return sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a safetensors index ({e})") from None
    return sorted(model_dir.glob("*.safetensors"))


def _shard_digest(path: Path, h) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {n} past the file's size)")
        raw = f.read(n)
        try:
            header = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
        h.update(f"{path.name}\0{size}\0".encode())
        h.update(raw)
        base = 8 + n
        for name in sorted(k for k in header if k != "__metadata__"):
            try:
                begin, end = header[name]["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise ValueError(f"{path}: tensor {name!r} has no data_offsets") from None
            for at in sorted({begin, max(begin, (begin + end) // 2 - _SAMPLE // 2), max(begin, end - _SAMPLE)}):
                f.seek(base + at)
                h.update(f.read(min(_SAMPLE, end - at)))


def identity(model_dir: Path, compute_dtype: str) -> dict[str, str]:
    """{"config", "quantization", "compute_dtype", "weights"} of a checkpoint directory, each a short
    string; two models whose identities are equal make the same state from the same tokens."""
    model_dir = Path(model_dir)
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except OSError as e:
        raise ValueError(f"{model_dir}: cannot read config.json ({e.strerror})") from None
    except ValueError as e:
        raise ValueError(f"{model_dir / 'config.json'}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{model_dir / 'config.json'}: not a JSON object")
    quant = next((config[k] for k in _QUANT_KEYS if k in config), None)
    model_fields = {k: v for k, v in config.items()
                    if k not in _NOT_MODEL and k not in _QUANT_KEYS and not k.startswith("_")}
    shards = _shards(model_dir)
    if not shards:
        raise ValueError(f"{model_dir}: no *.safetensors weight files found")
    h = hashlib.sha256()
    for shard in shards:
        try:
            _shard_digest(shard, h)
        except OSError as e:
            raise ValueError(f"{shard}: cannot read ({e.strerror})") from None
    return {
        "config": _digest(_canonical(model_fields)),
        "quantization": "none" if quant is None else _digest(_canonical(quant)),
        "compute_dtype": str(compute_dtype).removeprefix("mlx.core."),
        "weights": h.hexdigest()[:32],
    }


def fingerprint(ident: dict[str, str]) -> str:
    """A short hex digest of an identity (file names, disk-cache keys)."""
    return _digest(_canonical(ident))[:16]


def differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """One line per field that differs, e.g. "weights: 3f2a9c01… vs 9c1d4e77…", for error messages."""
    def short(v):
        return "(none)" if v is None else v if len(v) <= 12 else v[:8] + "…"

    return [f"{k}: {short(a.get(k))} vs {short(b.get(k))}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k)]
