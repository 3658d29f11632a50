"""llama.cpp importance matrices: the GGUF format (`<name>.in_sum2` [n_mat, ne0], `<name>.counts`
[n_mat, 1]) and the legacy .dat format, mapped onto our tensor names and column order.

importance = in_sum2 / counts: the mean squared input activation of each input column (per expert
for the stacked expert tensors). Legacy files store (sum / count) * ncall per value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConvertError
from .gguf_inverse import Geometry, importance_inverse


@dataclass
class Entry:
    sum2: np.ndarray  # [n_mat, ne0] float64
    counts: np.ndarray  # [n_mat] float64

    @property
    def n_mat(self) -> int:
        return self.sum2.shape[0]

    def importance(self) -> np.ndarray:
        """[n_mat, ne0] mean squared input; matrices that saw no tokens get the mean of the others."""
        counts = self.counts[:, None]
        seen = self.counts > 0
        if not seen.any():
            return np.ones_like(self.sum2)
        imp = np.where(counts > 0, self.sum2 / np.where(counts > 0, counts, 1), 0.0)
        if not seen.all():
            imp[~seen] = self.sum2[seen].sum(0) / self.counts[seen].sum()
        return imp


@dataclass
class IMatrix:
    path: Path
    entries: dict[str, Entry]  # GGUF weight names, e.g. blk.0.ffn_up_exps.weight
    legacy: bool
    datasets: list[str]
    chunks: int | None


def read_imatrix(path) -> IMatrix:
    path = Path(path)
    try:
        head = path.read_bytes()[:4] if path.is_file() else None
    except OSError as e:
        raise ConvertError(f"{path}: cannot read imatrix ({e.strerror})") from None
    if head is None:
        raise ConvertError(f"{path}: no such imatrix file")
    if not head:
        raise ConvertError(f"{path}: empty imatrix file")
    imatrix = _read_gguf(path) if head == b"GGUF" else _read_legacy(path)
    if not imatrix.entries:
        raise ConvertError(f"{path}: imatrix holds no entries")
    return imatrix


def _read_gguf(path: Path) -> IMatrix:
    from .gguf_reader import open_header

    f, mm, head = open_header(path)
    try:
        kind = head.value("general.type")
        if kind != "imatrix":
            raise ConvertError(f"{path}: a GGUF but not an imatrix (general.type is {kind!r})")
        arrays = {}
        for name, dims, type_id, offset in head.tensor_infos:
            if type_id != 0:  # F32
                raise ConvertError(f"{path}: imatrix tensor {name} is not F32")
            count = int(np.prod(dims, dtype=np.int64))
            start = head.data_start + offset
            if start + 4 * count > len(mm):
                raise ConvertError(f"{path}: truncated imatrix (tensor {name})")
            shape = tuple(int(d) for d in reversed(dims))
            arrays[name] = np.frombuffer(mm, np.float32, count=count, offset=start).astype(np.float64).reshape(shape)
        datasets = head.value("imatrix.datasets", [])
        chunks = head.value("imatrix.chunk_count")
    finally:
        mm.close()
        f.close()
    entries = {}
    for name, sum2 in arrays.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        if base + ".counts" not in arrays:
            raise ConvertError(f"{path}: {name} has no matching {base}.counts")
        sum2 = sum2.reshape(-1, sum2.shape[-1])
        counts = arrays[base + ".counts"].reshape(-1)
        if counts.shape[0] != sum2.shape[0]:
            raise ConvertError(f"{path}: {base}: {sum2.shape[0]} matrices but {counts.shape[0]} counts")
        entries[base] = Entry(sum2, counts)
    return IMatrix(path, entries, False, list(datasets), int(chunks) if chunks is not None else None)


def _read_legacy(path: Path) -> IMatrix:
    data = path.read_bytes()
    pos = 0

    def unpack(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ConvertError(f"{path}: truncated legacy imatrix (or not an imatrix file)")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = unpack("<i")
    if not 0 < n_entries < 1_000_000:
        raise ConvertError(f"{path}: not an imatrix (neither GGUF nor the legacy .dat format)")
    entries = {}
    for _ in range(n_entries):
        (length,) = unpack("<i")
        if not 0 < length < 4096:
            raise ConvertError(f"{path}: corrupt legacy imatrix (entry name length {length})")
        name = unpack(f"<{length}s")[0].decode("utf-8", "replace")
        ncall, nval = unpack("<ii")
        values = np.array(unpack(f"<{nval}f"), np.float64)
        ncall = max(ncall, 1)
        # values are (sum / count) * ncall; the matrix count is not stored, so shape comes later
        entries[name] = Entry(values[None, :], np.array([float(ncall)]))
    chunks = unpack("<i")[0] if pos + 4 <= len(data) else None
    datasets = []
    if pos + 4 <= len(data):
        (length,) = unpack("<i")
        if 0 < length <= len(data) - pos:
            datasets = [data[pos:pos + length].decode("utf-8", "replace")]
    return IMatrix(path, entries, True, datasets, chunks)


def write_legacy(path, entries: dict[str, Entry], chunks: int = 1, dataset: str = "") -> None:
    """The legacy .dat layout (for tests and for tools that still want it)."""
    out = [struct.pack("<i", len(entries))]
    for name in sorted(entries):
        e = entries[name]
        ncall = int(max(e.counts.max(), 1))
        values = (e.importance() * ncall).reshape(-1).astype(np.float32)
        raw = name.encode()
        out += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    raw = dataset.encode()
    out += [struct.pack("<i", chunks), struct.pack("<i", len(raw)), raw]
    Path(path).write_bytes(b"".join(out))


def write_gguf(path, entries: dict[str, Entry], chunks: int = 1, chunk_size: int = 512,
               datasets: tuple[str, ...] = ()) -> None:
    """llama.cpp's current imatrix layout."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="imatrix")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", list(datasets) or ["unknown"])
    writer.add_uint32("imatrix.chunk_count", chunks)
    writer.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(entries):
        e = entries[name]
        writer.add_tensor(f"{name}.in_sum2", e.sum2.astype(np.float32))
        writer.add_tensor(f"{name}.counts", e.counts.astype(np.float32).reshape(-1, 1))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def map_to_model(imatrix: IMatrix, g: Geometry, shapes: dict[str, tuple[int, ...]]) -> dict[str, Entry]:
    """Entries under our tensor names, columns in our order. Any entry that names no tensor of this
    model, or whose shape does not fit it, is refused (the first one is named)."""
    out: dict[str, Entry] = {}
    for name in sorted(imatrix.entries, key=_natural):
        e = imatrix.entries[name]
        targets = importance_inverse(name, g)
        if not targets:
            raise ConvertError(f"{imatrix.path}: imatrix entry {name!r} names no tensor of a Qwen3.5 model "
                               "(an imatrix of another model?)")
        for ours, reorder in targets:
            shape = shapes.get(ours)
            if shape is None:
                raise ConvertError(f"{imatrix.path}: imatrix entry {name!r} ({ours}) is not in this model")
            n_mat = shape[0] if len(shape) == 3 else 1
            in_dim = shape[-1]
            sum2, counts = e.sum2, e.counts
            if imatrix.legacy and sum2.size == n_mat * in_dim and n_mat > 1:
                sum2 = sum2.reshape(n_mat, in_dim)
                counts = np.full(n_mat, counts[0])
            if sum2.shape != (n_mat, in_dim):
                raise ConvertError(
                    f"{imatrix.path}: imatrix entry {name!r} has shape {list(sum2.shape)} but this model's "
                    f"{ours} needs [{n_mat}, {in_dim}] (an imatrix of another model?)")
            out[ours] = Entry(reorder(sum2), counts)
    return out


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in name.split(".")]
