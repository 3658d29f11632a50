"""Output directory: safetensors shards written in place under temporary names, renamed when
complete; a state file so a rerun resumes from finished shards; the index; small JSON files.

A shard's header is fixed by the plan before any data is computed, so tensors (and row chunks of
tensors) are written straight to their offsets and never held whole in memory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .errors import ConvertError
from .plan import Item, OutTensor

STATE = ".deltaserve-convert.json"
FORMAT_VERSION = 1
OUTPUT_GLOBS = ("model-*.safetensors", ".model-*.safetensors.partial", "model.safetensors.index.json",
                "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "special_tokens_map.json", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.json", "convert_report.md", "convert_report.json",
                "awq_scales.safetensors", STATE)


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def header(outputs: list[OutTensor], metadata: dict | None = None) -> tuple[bytes, dict[str, int]]:
    """safetensors header (8-byte length + JSON padded to 8) and each tensor's data offset."""
    entries, offsets, pos = {"__metadata__": {"format": "mlx", **(metadata or {})}}, {}, 0
    for t in outputs:
        entries[t.key] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        offsets[t.key] = pos
        pos += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    return len(raw).to_bytes(8, "little") + raw, {k: start + v for k, v in offsets.items()}


class ShardFile:
    """One shard being written: pwrite tensor bytes at their offsets, then commit (fsync + rename)."""

    def __init__(self, directory: Path, name: str, items: list[Item]):
        self.final = directory / name
        self.temp = directory / f".{name}.partial"
        outputs = [t for item in items for t in item.outputs]
        head, self.offsets = header(outputs)
        self.size = len(head) + sum(t.nbytes for t in outputs)
        self.fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self.fd, self.size)
        os.pwrite(self.fd, head, 0)

    def write(self, key: str, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        pos = self.offsets[key] + offset
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def commit(self) -> None:
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.replace(self.temp, self.final)

    def abandon(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_small_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    """A whole small file of float32 numpy tensors (e.g. the AWQ scales), written atomically."""
    import numpy as np

    outputs = [OutTensor(k, "F32", tuple(v.shape)) for k, v in tensors.items()]
    head, _ = header(outputs, metadata)
    body = b"".join(np.ascontiguousarray(v, np.float32).tobytes() for v in tensors.values())
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(head + body)
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_index(directory: Path, shards: list[list[Item]], total: int) -> None:
    weight_map = {}
    for i, items in enumerate(shards):
        for item in items:
            for t in item.outputs:
                weight_map[t.key] = shard_name(i, len(shards))
    write_json(directory / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def read_state(directory: Path) -> dict | None:
    try:
        return json.loads((directory / STATE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def prepare(directory: Path, fingerprint: str, overwrite: bool) -> dict:
    """Create or reuse the output directory. Returns its state: {"fingerprint", "complete"}.
    Refuses a directory holding another model or another conversion unless overwrite."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ConvertError(f"{directory}: exists and is not a directory")
    state = read_state(directory) if directory.is_dir() else None
    if state is not None and state.get("fingerprint") == fingerprint:
        return state
    foreign = directory.is_dir() and (any(directory.glob("config.json")) or any(directory.glob("*.safetensors")))
    if (state is not None or foreign) and not overwrite:
        what = "another conversion (different input or options)" if state else "a model"
        raise ConvertError(f"{directory}: already holds {what}; choose another output directory or "
                           "pass --overwrite")
    if directory.is_dir():
        clear(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".{STATE}.probe"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConvertError(f"{directory}: cannot write the output ({e.strerror})") from None
    state = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "complete": False}
    write_json(directory / STATE, state)
    return state


def clear(directory: Path) -> None:
    """Remove what a conversion writes (and nothing else)."""
    for pattern in OUTPUT_GLOBS:
        for path in directory.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


def mark_complete(directory: Path, state: dict) -> None:
    write_json(directory / STATE, {**state, "complete": True})
