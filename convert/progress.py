"""Progress: a one-line bar (bytes, tensors, rate, ETA) on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass


@dataclass
class Status:
    done_bytes: int
    total_bytes: int
    done_tensors: int
    total_tensors: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.done_bytes / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        return (self.total_bytes - self.done_bytes) / self.rate if self.rate > 0 else None


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def line(st: Status) -> str:
    pct = 100 * st.done_bytes / st.total_bytes if st.total_bytes else 100.0
    return (f"{pct:5.1f}%  {_size(st.done_bytes)} / {_size(st.total_bytes)}  tensors {st.done_tensors}/"
            f"{st.total_tensors}  {_size(st.rate)}/s  ETA {_duration(st.eta)}")


class Progress:
    """Calls `callback(Status)` if given; otherwise draws on a terminal or logs every `interval` s."""

    def __init__(self, mode=None, stream=None, interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.callback = mode if callable(mode) else None
        self.enabled = mode is not False
        self.tty = mode is True or (mode is None and getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if not self.tty else 0.2
        self.start = time.monotonic()
        self.last = 0.0
        self.total_bytes = self.total_tensors = self.done_bytes = self.done_tensors = 0

    def begin(self, total_bytes: int, total_tensors: int) -> None:
        self.total_bytes, self.total_tensors = total_bytes, total_tensors
        self.start = time.monotonic()

    def status(self) -> Status:
        return Status(self.done_bytes, self.total_bytes, self.done_tensors, self.total_tensors,
                      time.monotonic() - self.start)

    def advance(self, nbytes: int = 0, tensors: int = 0) -> None:
        self.done_bytes += nbytes
        self.done_tensors += tensors
        if self.callback:
            self.callback(self.status())
            return
        now = time.monotonic()
        if self.enabled and (now - self.last >= self.interval or self.done_tensors == self.total_tensors and tensors):
            self.last = now
            self._draw(line(self.status()))

    def _draw(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write("deltaserve convert: " + text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if not self.enabled or self.callback:
            return
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text.rstrip("\n") + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.enabled and self.tty and not self.callback:
            self.stream.write("\n")
            self.stream.flush()
