"""Server settings: one dataclass filled from the command line, a config file, or a test."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

TOOL_CALL_PARSERS = ("qwen3", "qwen3_coder", "qwen3_xml", "hermes")  # one parser reads all these formats
REASONING_PARSERS = ("qwen3", "deepseek_r1", "none")
# A prompt with more characters than this per token of context cannot fit (English runs at ~4, code
# a little more), so it is refused before the tokenizer spends seconds on it.
PROMPT_CHARS_PER_TOKEN = 16
DEFAULT_DISK_CACHE_BYTES = 32 << 30  # a few long agent sessions of a large model


@dataclass
class Settings:
    served_model_names: list[str] = field(default_factory=lambda: ["deltaserve"])
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None
    max_tokens: int = 4096  # the default when a request does not say
    max_model_len: Optional[int] = None  # default: the model's max_position_embeddings
    max_num_seqs: int = 32
    max_queue: int = 256
    continuous_batching: bool = True
    enable_prefix_cache: bool = True
    prefix_cache_bytes: Optional[int] = None  # default: the engine's share of the memory budget
    prefix_cache_dir: Optional[str] = None  # the prefix cache's disk tier; off when None
    prefix_cache_disk_bytes: int = DEFAULT_DISK_CACHE_BYTES
    model_fingerprint: str = ""  # model.fingerprint of the served files: keys the disk tier
    memory_budget_bytes: Optional[int] = None
    prefill_tokens_per_step: int = 512
    enable_auto_tool_choice: bool = True  # False: vLLM's default, "auto" gets a 400
    tool_call_parser: Optional[str] = "qwen3"
    reasoning_parser: Optional[str] = "qwen3"
    chat_template_kwargs: dict = field(default_factory=dict)
    responses_store_bytes: int = 64 << 20  # stored /v1/responses (previous_response_id), least recently used out
    log_level: str = "info"
    # limits (docs/serving.md, "Limits"): what one client can make the server hold
    max_body_bytes: int = 32 << 20
    max_prompt_chars: Optional[int] = None  # default: PROMPT_CHARS_PER_TOKEN x the context length
    header_timeout_s: float = 10.0  # from connecting (or the last response) to the end of the request headers
    keep_alive_timeout_s: float = 5.0  # idle keep-alive connections are closed after this
    max_connections: int = 512  # open connections; past it, requests get a 503
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long running requests may go on before they are ended
    # browser safety (docs/serving.md, "Security")
    allowed_origins: list[str] = field(default_factory=list)  # CORS; none by default
    allowed_hosts: list[str] = field(default_factory=list)  # more Host names a loopback-bound server answers
    num_speculative_tokens: int = 0  # --speculative-config: MTP drafts per decode step (0: off)

    def __post_init__(self):
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        if self.reasoning_parser == "none":
            self.reasoning_parser = None
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")
        if not self.served_model_names:
            raise ValueError("at least one served model name is needed")
        if self.max_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_tokens and max_num_seqs must be at least 1")
        if self.prefix_cache_disk_bytes < 1:
            raise ValueError("prefix_cache_disk_bytes must be at least 1")
        if self.max_body_bytes < 1 or self.max_connections < 1 or (self.max_prompt_chars or 1) < 1:
            raise ValueError("max_body_bytes, max_connections and max_prompt_chars must be at least 1")
        if min(self.header_timeout_s, self.keep_alive_timeout_s) <= 0 or self.shutdown_timeout_s < 0:
            raise ValueError("header_timeout_s and keep_alive_timeout_s must be positive, shutdown_timeout_s "
                             "not negative")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def prompt_chars(self, max_model_len: int) -> int:
        return self.max_prompt_chars or PROMPT_CHARS_PER_TOKEN * max_model_len

    @property
    def num_seqs(self) -> int:
        """Without continuous batching, one sequence at a time (vmlx's simple mode)."""
        return self.max_num_seqs if self.continuous_batching else 1

    def engine_config(self):
        from server.engine import EngineConfig

        return EngineConfig(
            max_num_seqs=self.num_seqs,
            max_queue=self.max_queue,
            prefill_tokens_per_step=self.prefill_tokens_per_step,
            max_model_len=self.max_model_len,
            memory_budget_bytes=self.memory_budget_bytes,
            prefix_cache_bytes=self.prefix_cache_bytes if self.enable_prefix_cache else 0,
            prefix_cache_dir=self.prefix_cache_dir if self.enable_prefix_cache else None,
            prefix_cache_disk_bytes=self.prefix_cache_disk_bytes,
            model_fingerprint=self.model_fingerprint,
            num_speculative_tokens=self.num_speculative_tokens,
        )
