"""The prefix cache's disk tier: KV segments and states in a directory that outlives the server.

One safetensors file per segment, named by a digest of the model's fingerprint and the token path
from position 0 to the segment's end, so a file can only ever be found along the tokens that made
it. A segment covers [start, end) of that path and names its parent (the segment ending at start);
restoring a point concatenates the KV of the chain from 0 and takes the state at its end.

Writes go through one background thread so that `put` never waits for the disk. `put` takes a
memoryview of each (already evaluated) array on the caller's thread, which is where MLX settles an
array before exposing its buffer; the writer only reads those views (no copy for a contiguous array,
one for a slice of a larger one), so it makes no MLX call at all and MLX never runs from two threads.

A file is written under a temporary name, then renamed; its header carries the format, the model
fingerprint, the chain links and a SHA-256 over the header and data, verified on every read. A
file that fails any check is removed with the segments chaining through it, and the caller simply
prefills. One server per directory: a starting server removes temporary files it finds there.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import queue
import re
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

log = logging.getLogger(__name__)

FORMAT = "deltaserve-prefix-cache/1"
_NAME = re.compile(r"^([0-9a-f]{32})\.safetensors$")
_KEY = re.compile(r"[0-9a-f]{32}")
_TMP = re.compile(r"^[0-9a-f]{32}\.\d+\.\d+\.tmp$")
_DTYPES = {mx.float32: "F32", mx.float16: "F16", mx.bfloat16: "BF16", mx.int8: "I8", mx.uint8: "U8",
           mx.int16: "I16", mx.uint16: "U16", mx.int32: "I32", mx.uint32: "U32", mx.int64: "I64",
           mx.uint64: "U64", mx.bool_: "BOOL"}
_MAX_HEADER = 100 << 20
_CLOSE_WAIT_S = 60.0


class _Corrupt(Exception):
    """A file that must not be trusted; the message says which check failed."""


@dataclass
class _Segment:
    key: str
    parent: str  # "" for a segment starting at 0
    start: int
    end: int
    has_state: bool
    has_logits: bool
    nbytes: int
    # while queued: the arrays (kv, state, logits), their buffers and the file's header; None once on disk
    arrays: tuple | None = field(default=None, repr=False)
    views: list | None = field(default=None, repr=False)
    header: dict | None = field(default=None, repr=False)


class DiskCache:
    def __init__(self, directory: str | Path, max_bytes: int, fingerprint: str,
                 max_queued_bytes: int = 2 << 30) -> None:
        if not fingerprint:
            raise ValueError("DiskCache needs the model's fingerprint (model.fingerprint)")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.max_queued_bytes = max_queued_bytes
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._segments: OrderedDict[str, _Segment] = OrderedDict()  # least recently used first
        self._children: dict[str, set[str]] = {}
        self._ends: dict[int, int] = {}  # end position -> how many segments end there
        self._queued, self._queued_bytes = 0, 0  # segments waiting for the writer
        self._total = 0  # bytes of every indexed segment, queued ones included
        self._closed = False
        self._stats = dict(hits=0, misses=0, read_bytes=0, written_bytes=0, read_seconds=0.0,
                           write_seconds=0.0, errors=0, dropped=0, evicted=0)
        self._rebuild()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="prefix-cache-disk", daemon=True)
        self._writer.start()

    # ---------------------------------------------------------------- keys and chains

    def _keys(self, tokens: Sequence[int], lengths) -> dict[int, str]:
        """length -> key of tokens[:length], for each length (one pass over the tokens)."""
        buf = np.asarray(tokens, dtype="<u4").tobytes()
        h = hashlib.sha256(self.fingerprint.encode() + b"\0")
        keys, done = {}, 0
        for n in sorted(set(lengths)):
            h.update(buf[4 * done:4 * n])
            done = n
            keys[n] = h.copy().hexdigest()[:32]
        return keys

    def _chain_ends(self, tokens: Sequence[int]) -> dict[int, _Segment]:
        """end -> segment for every stored segment along tokens whose chain reaches back to 0.
        Caller holds the lock."""
        keys = self._keys(tokens, [e for e in self._ends if e <= len(tokens)])
        found: dict[int, _Segment] = {}
        for end in sorted(keys):
            seg = self._segments.get(keys[end])
            if seg is not None and (seg.start == 0 or seg.start in found):
                found[end] = seg
        return found

    def _chain(self, seg: _Segment) -> list[_Segment]:
        chain = [seg]
        while chain[-1].parent:
            chain.append(self._segments[chain[-1].parent])  # every segment's parent is indexed
        return chain[::-1]

    # ---------------------------------------------------------------- the contract

    def kv_covered(self, tokens: Sequence[int]) -> int:
        with self._lock:
            return max(self._chain_ends(tokens), default=0)

    def lookup(self, tokens: Sequence[int]) -> int:
        with self._lock:
            found = self._chain_ends(tokens)
            depth = max((e for e, s in found.items() if s.has_state and (e < len(tokens) or s.has_logits)),
                        default=0)
            self._stats["hits" if depth else "misses"] += 1
            if depth:
                for seg in self._chain(found[depth]):
                    self._segments.move_to_end(seg.key)
            return depth

    def put(self, tokens: Sequence[int], start: int, kv, state, logits) -> None:
        end = len(tokens)
        if self._closed or not 0 <= start < end:
            return
        arrays = (list(kv), list(state) if state is not None else None, logits)
        named = _named(arrays)
        if sum(a.nbytes for _, a in named) > self.max_bytes:
            return
        if any(a.dtype not in _DTYPES for _, a in named):
            log.warning("prefix cache disk: a %s array has no safetensors dtype; segment not stored",
                        next(a.dtype for _, a in named if a.dtype not in _DTYPES))
            return
        keys = self._keys(tokens, [start, end])
        parent = keys[start] if start else ""
        seg = _Segment(keys[end], parent, start, end, state is not None, logits is not None, 0, arrays)
        seg.header = self._header(seg, named)
        seg.nbytes = _file_size(seg.header)
        if seg.nbytes > self.max_bytes:
            return
        seg.views = [memoryview(a) for _, a in named]  # here, on the one thread that runs MLX
        with self._lock:
            if seg.key in self._segments:
                self._segments.move_to_end(seg.key)
                return
            if parent and parent not in self._segments:
                return  # the chain below was evicted meanwhile: this segment could never be restored
            if self._queued_bytes and self._queued_bytes + seg.nbytes > self.max_queued_bytes:
                self._stats["dropped"] += 1  # the disk is behind: drop rather than hold memory or wait
                return
            self._add(seg)
            for s in self._chain(seg):
                self._segments.move_to_end(s.key)
            self._queued += 1
            self._queued_bytes += seg.nbytes
            doomed = self._evict_for(seg)
        self._jobs.put(("write", seg))
        for path in doomed:
            self._jobs.put(("delete", path))

    def load(self, tokens: Sequence[int], depth: int):
        with self._lock:
            seg = self._chain_ends(tokens[:depth]).get(depth)
            if seg is None or not seg.has_state:
                return None
            chain = self._chain(seg)
            for s in chain:
                self._segments.move_to_end(s.key)
        parts = []
        for s in chain:
            arrays = s.arrays  # read once: the writer clears it when the file is in place
            if arrays is None:
                arrays = self._read(s)
                if arrays is None:
                    return None
            parts.append(arrays)
        n_layers = len(parts[0][0])
        if any(len(p[0]) != n_layers for p in parts):
            log.warning("prefix cache disk: a chain of segments with different layer counts; ignored")
            return None
        if len(parts) == 1:
            kv = parts[0][0]
        else:  # [1, Hkv, end - start, D] per segment -> [1, Hkv, depth, D]
            try:
                kv = [tuple(mx.concatenate([p[0][i][j] for p in parts], axis=2) for j in (0, 1))
                      for i in range(n_layers)]
            except ValueError as e:  # segments of one fingerprint always agree; a bug must not crash a step
                log.warning("prefix cache disk: a chain's segments do not concatenate (%s); ignored", e)
                return None
        return kv, parts[-1][1], parts[-1][2]

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats, bytes=self._total - self._queued_bytes,
                        files=len(self._segments) - self._queued, queued=self._queued,
                        queued_bytes=self._queued_bytes, max_bytes=self.max_bytes)

    def close(self, timeout: float = _CLOSE_WAIT_S) -> None:
        if self._closed:
            return
        self._closed = True
        self._jobs.put(("stop", None))
        self._writer.join(timeout)
        if self._writer.is_alive():
            log.warning("prefix cache disk: writes still queued after %.0f s at shutdown; left unwritten", timeout)

    # ---------------------------------------------------------------- index

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def _add(self, seg: _Segment) -> None:
        self._segments[seg.key] = seg
        self._total += seg.nbytes
        self._children.setdefault(seg.parent, set()).add(seg.key)
        self._ends[seg.end] = self._ends.get(seg.end, 0) + 1

    def _remove(self, key: str) -> list[Path]:
        """Drop a segment and every segment chaining through it; the files to delete. Caller holds the lock."""
        paths, stack = [], [key]
        while stack:
            seg = self._segments.pop(stack.pop(), None)
            if seg is None:
                continue
            self._total -= seg.nbytes
            stack.extend(self._children.pop(seg.key, ()))
            self._children.get(seg.parent, set()).discard(seg.key)
            self._ends[seg.end] -= 1
            if not self._ends[seg.end]:
                del self._ends[seg.end]
            if seg.arrays is None:
                paths.append(self._path(seg.key))
            else:
                self._queued -= 1  # its write finds it gone and discards the file
                self._queued_bytes -= seg.nbytes
        return paths

    def _evict_for(self, keep: _Segment) -> list[Path]:
        """Least recently used segments out (with their descendants) until the total fits, never
        `keep` or its ancestors. Caller holds the lock."""
        protected = {s.key for s in self._chain(keep)}
        doomed = []
        for key in list(self._segments):
            if self._total <= self.max_bytes:
                break
            if key in protected or key not in self._segments:
                continue
            before = len(self._segments)
            doomed += self._remove(key)
            self._stats["evicted"] += before - len(self._segments)
        return doomed

    def _rebuild(self) -> None:
        """The index from the files already there, oldest use first; the rest removed."""
        found = []
        for entry in os.scandir(self.directory):
            if _TMP.match(entry.name):
                self._unlink(Path(entry.path))
                continue
            m = _NAME.match(entry.name)
            if not m:
                continue  # not ours: left alone
            try:
                meta, _, size = self._read_header(Path(entry.path))
                seg = self._segment_from(meta, m[1], size)
                found.append((entry.stat().st_mtime, seg))
            except (OSError, _Corrupt) as e:
                log.info("prefix cache disk: removing %s (%s)", entry.name, e)
                self._stats["errors"] += 1
                self._unlink(Path(entry.path))
        for _, seg in sorted(found, key=lambda f: f[0]):
            self._add(seg)
        orphans = [k for k, seg in self._segments.items() if seg.parent and seg.parent not in self._segments]
        for key in orphans:  # a chain whose start is gone can never be restored
            for p in self._remove(key):
                self._unlink(p)
        for key in list(self._segments):
            if self._total <= self.max_bytes:
                break
            for p in self._remove(key):
                self._unlink(p)

    def _segment_from(self, meta: dict, key: str, size: int) -> _Segment:
        if meta.get("format") != FORMAT:
            raise _Corrupt(f"format {meta.get('format')!r}, not {FORMAT}")
        if meta.get("fingerprint") != self.fingerprint:
            raise _Corrupt(f"another model's file (fingerprint {meta.get('fingerprint')!r})")
        try:
            start, end = int(meta["start"]), int(meta["end"])
            seg = _Segment(key, meta["parent"], start, end, meta["state"] == "1", meta["logits"] == "1", size)
        except (KeyError, ValueError) as e:
            raise _Corrupt(f"header field {e}") from None
        if (meta.get("key") != key or not 0 <= start < end or not isinstance(seg.parent, str)
                or not _KEY.fullmatch(seg.parent or "0" * 32) or bool(seg.parent) != bool(start)):
            raise _Corrupt("header does not match the file name")
        return seg

    # ---------------------------------------------------------------- files

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("prefix cache disk: cannot remove %s (%s)", path, e)

    def _read_header(self, path: Path, raw: bytes | None = None) -> tuple[dict, dict, int]:
        """(metadata, header, file size) from the file (or its bytes); raises _Corrupt or OSError."""
        if raw is None:
            size = path.stat().st_size
            with open(path, "rb") as f:
                head = f.read(8)
                n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
                if not 0 < n <= min(_MAX_HEADER, size - 8):
                    raise _Corrupt("truncated header")
                text = f.read(n)
        else:
            size = len(raw)
            n = struct.unpack("<Q", raw[:8])[0] if size >= 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise _Corrupt("truncated header")
            text = raw[8:8 + n]
        try:
            header = json.loads(text)
            meta = header["__metadata__"]
        except (ValueError, KeyError, TypeError) as e:
            raise _Corrupt(f"unreadable header ({e})") from None
        if not isinstance(meta, dict):
            raise _Corrupt("unreadable header")
        return meta, header, size

    def _read(self, seg: _Segment):
        """The segment's arrays from its file, or None (the file and its descendants removed)."""
        path = self._path(seg.key)
        t0 = time.perf_counter()
        try:
            raw = path.read_bytes()
            meta, header, size = self._read_header(path, raw)
            if self._segment_from(meta, seg.key, size).end != seg.end:
                raise _Corrupt("header does not match the index")
            checksum = meta.pop("checksum", None)
            n = struct.unpack("<Q", raw[:8])[0]
            h = hashlib.sha256(_canonical(header))
            h.update(memoryview(raw)[8 + n:])
            if h.hexdigest() != checksum:
                raise _Corrupt("checksum mismatch")
            tensors = mx.load(io.BytesIO(raw), format="safetensors")
            n_kv, n_state = int(meta["kv_layers"]), int(meta["state_layers"])
            kv = [(tensors[f"kv.{i}.keys"], tensors[f"kv.{i}.values"]) for i in range(n_kv)]
            if any(k.shape[2] != seg.end - seg.start for k, _ in kv):
                raise _Corrupt("KV length does not match the segment")
            state = [(tensors[f"state.{j}.conv"], tensors[f"state.{j}.recurrent"]) for j in range(n_state)]
            arrays = (kv, state if seg.has_state else None, tensors.get("logits"))
        except (OSError, _Corrupt, KeyError, ValueError, RuntimeError) as e:
            log.warning("prefix cache disk: ignoring %s (%s)", path.name, e)
            with self._lock:
                self._stats["errors"] += 1
                doomed = self._remove(seg.key) if self._segments.get(seg.key) is seg else []
            for p in doomed + [path]:
                self._unlink(p)
            return None
        try:
            os.utime(path)  # the LRU order survives a restart
        except OSError:
            pass
        with self._lock:
            self._stats["read_bytes"] += len(raw)
            self._stats["read_seconds"] += time.perf_counter() - t0
        return arrays

    def _write_loop(self) -> None:
        while True:
            op, item = self._jobs.get()
            if op == "stop":
                return
            if op == "delete":
                self._unlink(item)
                continue
            try:
                self._write(item)
            except Exception as e:  # a full disk or a bad array must not stop the writer
                log.warning("prefix cache disk: writing a segment failed (%s)", e)
                with self._lock:
                    self._stats["errors"] += 1
                    doomed = self._remove(item.key) if self._segments.get(item.key) is item else []
                for p in doomed:
                    self._unlink(p)

    def _write(self, seg: _Segment) -> None:
        with self._lock:
            if self._segments.get(seg.key) is not seg:
                return  # evicted while queued
        t0 = time.perf_counter()
        header = seg.header
        datas = [mv if mv.c_contiguous else mv.tobytes() for mv in seg.views]  # a slice: one copy
        h = hashlib.sha256(_canonical(header))
        for data in datas:
            h.update(data)
        text = _header_bytes(header, h.hexdigest())
        tmp = self.directory / f"{seg.key}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(text)) + text)
                for data in datas:
                    f.write(data)
        except BaseException:
            self._unlink(tmp)  # a full disk leaves no half file behind
            raise
        with self._lock:
            current = self._segments.get(seg.key) is seg
            if current:
                os.replace(tmp, self._path(seg.key))
                seg.arrays = seg.views = seg.header = None
                self._queued -= 1
                self._queued_bytes -= seg.nbytes
                self._stats["written_bytes"] += seg.nbytes
                self._stats["write_seconds"] += time.perf_counter() - t0
        if not current:
            self._unlink(tmp)

    def _header(self, seg: _Segment, named: list) -> dict:
        """The file's safetensors header, all but its checksum: known before any byte is read."""
        header, offset = {}, 0
        for name, a in named:
            header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape),
                            "data_offsets": [offset, offset + a.nbytes]}
            offset += a.nbytes
        header["__metadata__"] = {
            "format": FORMAT, "fingerprint": self.fingerprint, "key": seg.key, "parent": seg.parent,
            "start": str(seg.start), "end": str(seg.end), "kv_layers": str(len(seg.arrays[0])),
            "state_layers": str(len(seg.arrays[1] or [])), "state": "1" if seg.has_state else "0",
            "logits": "1" if seg.has_logits else "0"}
        return header


def _named(arrays) -> list:
    kv, state, logits = arrays
    named = [(f"kv.{i}.{n}", a) for i, (k, v) in enumerate(kv) for n, a in (("keys", k), ("values", v))]
    named += [(f"state.{j}.{n}", a) for j, (c, r) in enumerate(state or []) for n, a in (("conv", c), ("recurrent", r))]
    return named + ([("logits", logits)] if logits is not None else [])


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _header_bytes(header: dict, checksum: str) -> bytes:
    text = _canonical({**header, "__metadata__": {**header["__metadata__"], "checksum": checksum}})
    return text + b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes


def _file_size(header: dict) -> int:
    data = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return 8 + len(_header_bytes(header, "0" * 64)) + data
