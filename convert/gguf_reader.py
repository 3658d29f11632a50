"""GGUF input: split parts, header checks, memory-mapped tensor rows with dequantisation, and the
model's HF-style text config rebuilt from the metadata."""

from __future__ import annotations

import mmap
import os
import re
import struct
from functools import cache
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import ConvertError
from .tensor import LazyTensor

ARCHITECTURES = {"qwen35moe": "qwen3_5_moe", "qwen35": "qwen3_5"}
FLOAT_TYPES = ("F32", "F16", "BF16")
_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_PAGE = mmap.PAGESIZE


@cache
def supported_types() -> tuple[str, ...]:
    """The GGML tensor types we can read: floats, plus every type gguf-py can dequantise."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    names = list(FLOAT_TYPES)
    for qtype in GGMLQuantizationType:
        if qtype.name in names or qtype.name.startswith(("I", "F")) and not qtype.name.startswith("IQ"):
            continue
        _block, size = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros((1, size), np.uint8), qtype)
        except Exception:  # gguf-py raises NotImplementedError or its own errors for unreadable types
            continue
        names.append(qtype.name)
    return tuple(names)


def find_parts(path: Path) -> list[Path]:
    """[path] for a single file; all parts, in order, for `…-00001-of-000NN.gguf`."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    if int(m["no"]) != 1:
        raise ConvertError(f"{path}: give the first part of a split GGUF (…-00001-of-{count:05d}.gguf)")
    parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ConvertError(f"{path}: split GGUF part {missing[0]} is missing ({len(missing)} of {count} missing)")
    return parts


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Header:
    """GGUF header parser: metadata values and tensor infos. Written for speed on big vocabularies:
    string arrays (tokens, merges) are walked over, not decoded; `value()` decodes on demand."""

    def __init__(self, path: Path, mm):
        self.path, self.mm = path, mm
        self.pos = 0
        magic, version = self._unpack("<4sI")
        if magic != b"GGUF":
            raise ConvertError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        if version not in (2, 3):
            raise ConvertError(f"{path}: unsupported GGUF version {version} (expected 3)")
        n_tensors, n_kv = self._unpack("<QQ")
        if n_tensors > 10_000_000 or n_kv > 10_000_000:
            raise ConvertError(f"{path}: corrupt GGUF header (counts {n_tensors}, {n_kv})")
        self.raw_fields: dict[str, tuple[int, int]] = {}  # key -> (value type, position)
        self.value_end: dict[str, int] = {}
        for _ in range(n_kv):
            key = self._string()
            (vtype,) = self._unpack("<I")
            self.raw_fields[key] = (vtype, self.pos)
            self._skip_value(vtype)
            self.value_end[key] = self.pos
        self.tensor_infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("<I")
            if n_dims > 8:
                raise ConvertError(f"{path}: corrupt GGUF header (tensor {name} has {n_dims} dimensions)")
            dims = self._unpack(f"<{n_dims}Q")
            qtype, offset = self._unpack("<IQ")
            self.tensor_infos.append((name, dims, qtype, offset))
        alignment = int(self.value("general.alignment", 32))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ConvertError(f"{path}: invalid general.alignment {alignment}")
        self.data_start = self.pos + (-self.pos % alignment)

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.mm):
            raise ConvertError(f"{self.path}: truncated GGUF (header ends early)")
        values = struct.unpack_from(fmt, self.mm, self.pos)
        self.pos += size
        return values

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        if self.pos + n > len(self.mm):
            raise ConvertError(f"{self.path}: truncated GGUF (header ends early)")
        raw = self.mm[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", "replace")

    def _skip_value(self, vtype: int) -> None:
        if vtype in _SCALARS:
            self.pos += struct.calcsize(_SCALARS[vtype])
        elif vtype == _STRING:
            (n,) = self._unpack("<Q")
            self.pos += n
        elif vtype == _ARRAY:
            etype, count = self._unpack("<IQ")
            if etype in _SCALARS:
                self.pos += count * struct.calcsize(_SCALARS[etype])
            elif etype == _STRING:
                mm, pos = self.mm, self.pos
                for _ in range(count):
                    pos += 8 + int.from_bytes(mm[pos:pos + 8], "little")
                self.pos = pos
            else:
                for _ in range(count):
                    self._skip_value(etype)
        else:
            raise ConvertError(f"{self.path}: corrupt GGUF header (value type {vtype})")
        if self.pos > len(self.mm):
            raise ConvertError(f"{self.path}: truncated GGUF (header ends early)")

    def digest(self, prefix: str) -> str:
        """sha256 of the keys and raw values of every field whose key starts with `prefix`."""
        import hashlib

        h = hashlib.sha256()
        for key in sorted(k for k in self.raw_fields if k.startswith(prefix)):
            h.update(key.encode())
            h.update(self.mm[self.raw_fields[key][1]:self.value_end[key]])
        return h.hexdigest()

    def value(self, key: str, default=None):
        if key not in self.raw_fields:
            return default
        vtype, pos = self.raw_fields[key]
        saved, self.pos = self.pos, pos
        try:
            return self._read_value(vtype)
        finally:
            self.pos = saved

    def _read_value(self, vtype: int):
        if vtype in _SCALARS:
            return self._unpack(_SCALARS[vtype])[0]
        if vtype == _STRING:
            return self._string()
        etype, count = self._unpack("<IQ")
        if etype in _SCALARS:
            fmt = _SCALARS[etype]
            size = struct.calcsize(fmt)
            values = np.frombuffer(self.mm, np.dtype(fmt), count=count, offset=self.pos).tolist()
            self.pos += count * size
            return values
        return [self._read_value(etype) for _ in range(count)]


def open_header(path: Path) -> tuple:
    """(file, mmap, _Header) of one GGUF file; the caller closes both."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        f.close()
        raise ConvertError(f"{path}: empty file")
    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return f, mm, _Header(path, mm)
    except BaseException:
        mm.close()
        f.close()
        raise


class _RawTensor:
    """One tensor's bytes inside one memory-mapped part."""

    def __init__(self, name, qtype, np_shape, mm, offset, nbytes):
        self.name, self.qtype, self.np_shape = name, qtype, tuple(int(d) for d in np_shape)
        self.mm, self.offset, self.nbytes = mm, offset, nbytes

    def lazy(self) -> LazyTensor:
        from gguf.quants import dequantize

        qtype, shape = self.qtype, self.np_shape
        raw = np.frombuffer(self.mm, np.uint8, count=self.nbytes, offset=self.offset)
        raw = raw.reshape(*shape[:-1], -1) if len(shape) > 1 else raw

        def take(index):
            if len(shape) == 1:  # one row of ne0 values: decode it whole, then select
                whole = _decode(raw, qtype, dequantize)
                return whole[index] if isinstance(index, slice) else whole[mx.array(index)]
            return _decode(raw[index], qtype, dequantize)

        def release():
            start = self.offset - self.offset % _PAGE
            self.mm.madvise(mmap.MADV_DONTNEED, start, self.offset + self.nbytes - start)

        return LazyTensor(shape, take, qtype.name, self.nbytes, release)


def _decode(raw: np.ndarray, qtype, dequantize) -> mx.array:
    name = qtype.name
    if name == "F32":
        return mx.array(raw.view(np.float32))
    if name == "F16":
        return mx.array(raw.view(np.float16))
    if name == "BF16":
        return mx.array(raw.view(np.uint16)).view(mx.bfloat16)
    return mx.array(dequantize(raw, qtype).astype(np.float32, copy=False))


class GGUFFile:
    """A GGUF model, one file or all parts of a split one. Metadata comes from the first part."""

    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise ConvertError(f"{path}: no such file")
        self.parts = find_parts(path)
        self._files, self._maps = [], []
        self.header = None
        self.tensors: dict[str, _RawTensor] = {}
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        supported = supported_types()
        for i, part in enumerate(self.parts):
            f, mm, head = open_header(part)
            self._files.append(f)
            self._maps.append(mm)
            if i == 0:
                self.header = head
            size = len(mm)
            for name, dims, type_id, offset in head.tensor_infos:
                try:
                    qtype = GGMLQuantizationType(type_id)
                except ValueError:
                    raise ConvertError(f"{part}: tensor {name} has unknown type id {type_id}; supported: "
                                       f"{', '.join(supported)}") from None
                if qtype.name not in supported:
                    raise ConvertError(f"{part}: tensor {name} has type {qtype.name}, which cannot be read; "
                                       f"supported: {', '.join(supported)}")
                block, type_size = GGML_QUANT_SIZES[qtype]
                np_shape = tuple(int(d) for d in reversed(dims))
                if not np_shape or np_shape[-1] % block:
                    raise ConvertError(f"{part}: tensor {name} has shape {list(dims)}, not whole {qtype.name} blocks")
                nbytes = int(np.prod(np_shape[:-1], dtype=np.int64)) * np_shape[-1] // block * type_size
                start = head.data_start + offset
                if start + nbytes > size:
                    raise ConvertError(f"{part}: truncated (tensor {name} ends past the end of the file)")
                if name in self.tensors:
                    raise ConvertError(f"{part}: tensor {name} appears twice")
                self.tensors[name] = _RawTensor(name, qtype, np_shape, mm, start, nbytes)
        self._check_split_counts()

    def _check_split_counts(self) -> None:
        count = self.get("split.count")
        if count is not None and int(count) != len(self.parts):
            raise ConvertError(f"{self.parts[0]}: metadata says {count} split parts, found {len(self.parts)}")
        total = self.get("split.tensors.count")
        if total is not None and int(total) != len(self.tensors):
            raise ConvertError(
                f"{self.parts[0]}: metadata lists {total} tensors across parts, found {len(self.tensors)}"
            )

    def close(self) -> None:
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a numpy view still exists; the mapping goes with it
                pass
        for f in self._files:
            f.close()
        self._maps, self._files = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def get(self, key: str, default=None):
        return self.header.value(key, default)

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", ""))

    def lazy(self, name: str) -> LazyTensor:
        return self.tensors[name].lazy()

    def quantized_types(self) -> list[str]:
        return sorted({t.qtype.name for t in self.tensors.values()} - set(FLOAT_TYPES))

    def identity(self) -> list[tuple[str, int, int]]:
        return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in self.parts]


def _scalar(value):
    if isinstance(value, (list, tuple)):
        nonzero = [v for v in value if v]
        return nonzero[0] if nonzero else value[0]
    return value


def _round_float(x: float) -> float:
    """GGUF stores float32; print 1e-06, not 9.999999974752427e-07."""
    return float(f"{float(x):.7g}")


def text_config(g: GGUFFile) -> dict:
    """The HF-style (flat) text config of a qwen35 / qwen35moe GGUF."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        hint = " (qwen3next GGUFs use another head layout)" if arch == "qwen3next" else ""
        raise ConvertError(
            f"{g.parts[0]}: unsupported architecture {arch!r}{hint}; supported: {', '.join(ARCHITECTURES)}"
        )

    def key(name, default=KeyError):
        value = g.get(f"{arch}.{name}")
        if value is None:
            if default is KeyError:
                raise ConvertError(f"{g.parts[0]}: metadata lacks {arch}.{name}")
            return default
        return value

    n_mtp = int(key("nextn_predict_layers", 0))
    n_layers = int(key("block_count")) - n_mtp
    interval = int(key("full_attention_interval", 4))
    recurrent = key("attention.recurrent_layers", None)
    if recurrent is not None:
        layer_types = ["linear_attention" if r else "full_attention" for r in list(recurrent)[:n_layers]]
    else:
        layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layers)]
    head_dim = int(key("attention.key_length"))
    v_heads = int(key("ssm.time_step_rank"))
    sections = list(key("rope.dimension_sections", [11, 11, 10, 0]))
    embed = g.tensors.get("token_embd.weight")
    if embed is None:
        raise ConvertError(f"{g.parts[0]}: no token_embd.weight tensor")
    config = {
        "model_type": ARCHITECTURES[arch],
        "vocab_size": embed.np_shape[0],
        "hidden_size": int(key("embedding_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(_scalar(key("attention.head_count"))),
        "num_key_value_heads": int(_scalar(key("attention.head_count_kv"))),
        "head_dim": head_dim,
        "layer_types": layer_types,
        "full_attention_interval": interval,
        "linear_num_key_heads": int(key("ssm.group_count")),
        "linear_num_value_heads": v_heads,
        "linear_key_head_dim": int(key("ssm.state_size")),
        "linear_value_head_dim": int(key("ssm.inner_size")) // v_heads,
        "linear_conv_kernel_dim": int(key("ssm.conv_kernel", 4)),
        "rms_norm_eps": _round_float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(key("context_length", 262144)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": _round_float(key("rope.freq_base", 1e7)),
            "partial_rotary_factor": int(key("rope.dimension_count", head_dim // 4)) / head_dim,
            "mrope_section": [int(s) for s in sections[:3]],
            "mrope_interleaved": True,
        },
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "mtp_num_hidden_layers": n_mtp,
    }
    if arch == "qwen35moe":
        config.update(
            num_experts=int(key("expert_count")),
            num_experts_per_tok=int(key("expert_used_count")),
            moe_intermediate_size=int(key("expert_feed_forward_length")),
            shared_expert_intermediate_size=int(key("expert_shared_feed_forward_length", 0)),
            norm_topk_prob=True,
        )
    else:
        config["intermediate_size"] = int(_scalar(key("feed_forward_length")))
    return config
