"""The server's warm-up: what the first requests would otherwise pay for, done before /health says
ready. MLX compiles its fused kernels on first use (on CPU a C++ compiler runs for each, and keeps
them under $TMPDIR/mlx/: on a machine's first start the demo model's first chat took 6-14 s, the
next ones 0.2 s), the chat template is compiled on its first render, and llguidance builds its view
of the vocabulary on the first constrained request (1.3 s for Qwen's 152k tokens).

One chat request that forces a tool call goes the request path (template, tokenizer, grammar)
without being counted anywhere, and the engine runs its prompt through every kind of step."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from .protocol import ChatCompletionRequest
from .serving import ServerState, chat_job

log = logging.getLogger("deltaserve.warmup")

# A string parameter (a lazy regex in the grammar) and an integer one (an embedded JSON schema).
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


class WarmUp:
    """Runs once on its own thread; `ready` is set when it is over. A warm-up that fails is logged
    and the server serves anyway: only the first requests' speed depended on it."""

    def __init__(self, state: ServerState):
        self.state = state
        self.ready = threading.Event()
        self.seconds: float | None = None
        self._thread = threading.Thread(target=self._run, name="deltaserve-warm-up", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        try:
            asyncio.run(self._warm())
        except Exception:
            log.exception("warm-up failed; serving anyway (the first requests may be slow)")
        else:
            self.seconds = time.monotonic() - start
            log.info("warmed up in %.1f s", self.seconds)
        finally:
            self.ready.set()

    async def _warm(self) -> None:
        state = self.state
        if getattr(state.tokenizer, "chat_template", None) is None:  # a completions-only model
            ids = list(state.tokenizer.encode(MESSAGES[0]["content"]))
            processors = [state.grammars.for_json(None, False)]
        else:
            job = await chat_job(state, ChatCompletionRequest(messages=MESSAGES, tools=[TOOL],
                                                              tool_choice="required"))
            ids, processors = job.prompt_ids, job.params.logits_processors
        state.engine.warm_up(ids, processors)
