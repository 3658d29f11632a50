"""Stored responses for GET /v1/responses/{id} and previous_response_id: in memory, bounded by
the size of their JSON, least recently used first out."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Stored:
    response: dict
    items: list[dict]  # the conversation up to this response: earlier inputs and outputs, this input

    def conversation(self) -> list[dict]:
        """What a response continuing this one starts from: its input items, then its output."""
        return [*self.items, *self.response["output"]]


class ResponseStore:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Stored, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, stored: Stored) -> None:
        size = len(json.dumps([stored.response, stored.items], ensure_ascii=False).encode())
        if size > self.max_bytes:
            return  # larger than the whole store: keeping it would evict everything else for nothing
        key = stored.response["id"]
        with self._lock:
            self._drop(key)
            self._entries[key] = (stored, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def get(self, key: str) -> Stored | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._drop(key)

    def _drop(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]
        return entry is not None
