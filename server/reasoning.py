"""Qwen3 reasoning: the text inside <think>...</think> goes to `reasoning_content`, the rest to
`content`. The chat template usually opens the block itself (the prompt ends with `<think>\n`),
so the parser can start inside it."""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the prompt's last turn has an unclosed <think> (the template pre-filled it)."""
    start = prompt.rfind("<|im_start|>")
    tail = prompt[start:] if start >= 0 else prompt
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


def _held(buf: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:n]):
            return n
    return 0


class ReasoningParser:
    """Splits streamed text into ("reasoning" | "content", text) pieces; any chunking gives the
    same pieces, merged. A <think> opens reasoning only before any content."""

    def __init__(self, in_reasoning: bool = False):
        self.in_reasoning = in_reasoning
        self.seen_content = False
        self.buf = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        return self._drain(final=False)

    def finish(self) -> list[tuple[str, str]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while self.buf:
            if self.in_reasoning:
                k = self.buf.find(THINK_CLOSE)
                if k >= 0:
                    out.append(("reasoning", self.buf[:k]))
                    self.buf = self.buf[k + len(THINK_CLOSE):]
                    self.in_reasoning, self.seen_content = False, False
                    continue
                hold = 0 if final else _held(self.buf, THINK_CLOSE)
                out.append(("reasoning", self.buf[: len(self.buf) - hold]))
                self.buf = self.buf[len(self.buf) - hold:]
                break
            if not self.seen_content:
                rest = self.buf.lstrip()
                if rest.startswith(THINK_OPEN):
                    self.buf = rest[len(THINK_OPEN):]
                    self.in_reasoning = True
                    continue
                if not final and THINK_OPEN.startswith(rest):
                    break
                self.seen_content = True
            out.append(("content", self.buf))
            self.buf = ""
        return [(channel, text) for channel, text in out if text]
