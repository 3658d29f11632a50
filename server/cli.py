"""`deltaserve` command line. Each subcommand is registered by one function taking the argparse
subparsers object; `serve` lives here, `convert` and `validate` in convert.cli."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from convert.cli import register as register_convert

from .settings import DEFAULT_DISK_CACHE_BYTES

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from '8G', '512MiB', '1073741824'."""
    t = str(text).strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in _SIZE_UNITS else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * _SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 8G, 512M, 1073741824)") from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def speculative_tokens(config: dict | None) -> int:
    """Drafts per step from vLLM's --speculative-config object (0 without one)."""
    if not config:
        return 0
    if not isinstance(config, dict):
        raise ValueError("--speculative-config must be a JSON object")
    unknown = sorted(set(config) - {"method", "num_speculative_tokens"})
    if unknown:
        raise ValueError(f"--speculative-config: unknown key(s) {', '.join(unknown)} "
                         "(supported: method, num_speculative_tokens)")
    if config.get("method") != "mtp":
        raise ValueError(f"--speculative-config: method must be \"mtp\" (the model's own MTP head), "
                         f"got {config.get('method')!r}")
    k = config.get("num_speculative_tokens")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 4:
        raise ValueError(f"--speculative-config: num_speculative_tokens must be an integer 1..4, got {k!r}")
    return k


def load_config_file(path: str) -> dict:
    """YAML, TOML or JSON; keys are flag names (--max-num-seqs or max_num_seqs)."""
    p = Path(path)
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config file must hold a mapping of option names to values")
    return {k.lstrip("-").replace("-", "_"): v for k, v in data.items()}


# ---------------------------------------------------------------- serve

def register_serve(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                              description="Serve a Qwen3.5 model over an OpenAI-compatible HTTP API.")
    p.add_argument("model", nargs="?", default=None,
                   help="MLX directory, HF checkpoint directory, GGUF file (any split part), or a Hugging Face "
                        "repo ORG/NAME (ORG/NAME:TAG picks a GGUF quantisation, e.g. :Q4_K_M, :BF16); "
                        "default: the embedded demo model")
    p.add_argument("--revision", help="branch, tag or commit of a Hugging Face MODEL (default: main)")
    p.add_argument("--config", help="YAML/TOML/JSON file of options (flag names as keys); flags override it")
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=os.environ.get("DELTASERVE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes; prefer the environment variable "
                        "DELTASERVE_API_KEY (a command line is visible to other users of the machine)")
    g.add_argument("--allowed-origins", nargs="+", default=[], metavar="ORIGIN",
                   help="origins that browsers may call from (CORS), e.g. http://localhost:3000, or '*' "
                        "(default: none)")
    g.add_argument("--allowed-hosts", nargs="+", default=[], metavar="HOST",
                   help="Host header names answered besides loopback ones when bound to loopback (e.g. a "
                        "reverse proxy's name; '*' for any; default: none, against DNS rebinding)")
    g.add_argument("--served-model-name", nargs="+", dest="served_model_name",
                   help="name(s) clients use in 'model' (default: the MODEL argument)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-size", type=parse_size, default=32 << 20, dest="max_body_bytes",
                   help="largest request body, e.g. 64M (default 32M; larger gets 413 before it is read)")
    g.add_argument("--max-prompt-chars", type=int,
                   help="longest prompt in characters, checked before tokenizing (default: 16 per token of "
                        "the context length)")
    g.add_argument("--header-timeout", type=float, default=10.0, dest="header_timeout_s",
                   help="seconds a connection has to send its request headers (default 10)")
    g.add_argument("--keep-alive-timeout", type=float, default=5.0, dest="keep_alive_timeout_s",
                   help="seconds an idle keep-alive connection stays open (default 5)")
    g.add_argument("--max-connections", type=int, default=512,
                   help="open connections at most; requests past it get 503 (default 512)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0, dest="shutdown_timeout_s",
                   help="on SIGTERM/SIGINT, seconds running requests may go on before they are ended "
                        "(default 30)")
    g = p.add_argument_group("generation")
    g.add_argument("--max-tokens", type=int, default=4096, help="default max_tokens of a request")
    g.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together")
    g.add_argument("--max-queue", type=int, default=256, help="requests allowed to wait (more get 429)")
    g.add_argument("--continuous-batching", action=argparse.BooleanOptionalAction, default=True,
                   help="batch requests as they come (default on; --no-continuous-batching runs one at a time)")
    g.add_argument("--enable-prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse state of shared prompt prefixes (default on)")
    g.add_argument("--prefix-cache-size", type=parse_size, dest="prefix_cache_bytes",
                   help="prefix cache budget, e.g. 4G (default: a quarter of the memory budget)")
    g.add_argument("--prefix-cache-dir", help="keep prefix-cache entries in this directory too (created if "
                   "missing): they survive restarts of the same model")
    g.add_argument("--prefix-cache-disk-size", type=parse_size, default=DEFAULT_DISK_CACHE_BYTES,
                   dest="prefix_cache_disk_bytes",
                   help="the directory's size at most, least recently used out, e.g. 100G (default 32G)")
    g.add_argument("--memory-budget", type=parse_size, dest="memory_budget_bytes",
                   help="memory for sequences and cache, e.g. 48G (default: 70%% of the machine)")
    g.add_argument("--prefill-chunk", type=int, default=512, dest="prefill_tokens_per_step",
                   help="prompt tokens prefilled per engine step")
    g.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help='speculative decoding with the model\'s MTP head, as vLLM takes it: '
                        '\'{"method": "mtp", "num_speculative_tokens": K}\' with K = 1..4 drafts per step')
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's)")
    g = p.add_argument_group("chat")
    g.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=True,
                   help="let the model decide whether to call a tool (tool_choice auto, the default when tools "
                        "are given; default on; --no-enable-auto-tool-choice answers such requests with a 400, "
                        "as vLLM does without the flag)")
    g.add_argument("--tool-call-parser", default="qwen3", choices=["qwen3", "qwen3_coder", "qwen3_xml", "hermes"],
                   help="Qwen3.5 XML and Qwen3 JSON tool calls (every choice reads both)")
    g.add_argument("--reasoning-parser", default="qwen3", choices=["qwen3", "deepseek_r1", "none"],
                   help="split <think> text into reasoning_content (default qwen3; 'none' leaves it in content)")
    g.add_argument("--chat-template-kwargs", type=_json_object, default={},
                   help='default template variables, e.g. \'{"enable_thinking": false}\'; requests override')
    g.add_argument("--responses-store-size", type=parse_size, default=64 << 20, dest="responses_store_bytes",
                   help="memory for stored /v1/responses (previous_response_id, GET), e.g. 256M (default 64M; "
                        "least recently used out)")
    g = p.add_argument_group("distributed (docs/distributed.md: the same command on every rank, under mlx.launch)")
    g.add_argument("--distributed", choices=["pipeline", "tensor"],
                   help="split the model across the mx.distributed ranks by layers (pipeline) or by heads and "
                        "experts' hidden units (tensor); rank 0 serves HTTP")
    g.add_argument("--distributed-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="a step or a wait for rank 0 that takes longer means a rank stopped answering: every "
                        "rank exits (default 60)")
    g = p.add_argument_group("conversion (GGUF or HF inputs; passed to the converter)")
    g.add_argument("--cache-dir", type=Path, help="where converted models are kept")
    g.add_argument("--quantize", action="store_true", default=None, help="quantise while converting")
    g.add_argument("--q-bits", type=int)
    g.add_argument("--q-group-size", type=int)
    g.add_argument("--q-recipe", help="quantisation recipe (name or configs/ file)")
    g.add_argument("--imatrix-path", help="local imatrix file, or a file in a Hugging Face repo: ORG/NAME:PATH "
                                          "(ORG/NAME alone: its one file named *imatrix*)")
    p.set_defaults(func=run_serve, _parser=p)


def _apply_config(args) -> None:
    """Options from --config fill whatever the command line left at its default."""
    if not args.config:
        return
    parser = args._parser
    values = load_config_file(args.config)
    actions = {}
    for a in parser._actions:
        for name in [a.dest, *(o.lstrip("-").replace("-", "_") for o in a.option_strings)]:
            actions[name] = a
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"{args.config}: unknown option(s) {', '.join(unknown)}")
    for key, value in values.items():
        action = actions[key]
        key = action.dest
        if getattr(args, key) != action.default:
            continue  # given on the command line
        if isinstance(value, str) and action.type is not None:
            value = action.type(value)
        if action.nargs == "+" and not isinstance(value, list):
            value = [value]
        setattr(args, key, value)


def settings_from_args(args):
    from .settings import Settings

    names = args.served_model_name or [args.model if args.model else "deltaserve-demo"]
    return Settings(
        served_model_names=list(names), host=args.host, port=args.port, api_key=args.api_key,
        max_tokens=args.max_tokens, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_queue=args.max_queue, continuous_batching=args.continuous_batching,
        enable_prefix_cache=args.enable_prefix_cache, prefix_cache_bytes=args.prefix_cache_bytes,
        prefix_cache_dir=args.prefix_cache_dir, prefix_cache_disk_bytes=args.prefix_cache_disk_bytes,
        memory_budget_bytes=args.memory_budget_bytes, prefill_tokens_per_step=args.prefill_tokens_per_step,
        enable_auto_tool_choice=args.enable_auto_tool_choice, tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser, chat_template_kwargs=dict(args.chat_template_kwargs or {}),
        responses_store_bytes=args.responses_store_bytes,
        log_level=args.log_level, max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
        header_timeout_s=args.header_timeout_s, keep_alive_timeout_s=args.keep_alive_timeout_s,
        max_connections=args.max_connections, shutdown_timeout_s=args.shutdown_timeout_s,
        allowed_origins=list(args.allowed_origins or []), allowed_hosts=list(args.allowed_hosts or []),
        num_speculative_tokens=speculative_tokens(args.speculative_config),
    )


def _check_writable_dir(path: Path, flag: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".deltaserve-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {path}: not a writable directory ({e.strerror})") from None


def run_serve(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _apply_config(args)
        settings = settings_from_args(args)
        if settings.prefix_cache_dir:
            _check_writable_dir(Path(settings.prefix_cache_dir), "--prefix-cache-dir")
        if args.distributed and settings.num_speculative_tokens:
            raise ValueError("--speculative-config does not work with --distributed yet")
    except (OSError, ValueError) as e:
        print(f"deltaserve serve: error: {e}", file=sys.stderr)
        return 2
    from model import ModelLoadError, load
    from model.fingerprint import fingerprint, identity

    from .model_source import ModelSourceError, resolve_model

    options = {"dtype": args.dtype, "quantize": args.quantize, "q_bits": args.q_bits,
               "q_group_size": args.q_group_size, "q_recipe": args.q_recipe, "imatrix_path": args.imatrix_path}
    if args.distributed:
        from .distributed import run as run_distributed

        return run_distributed(args, settings, options, _serve)
    try:
        path = resolve_model(args.model, options, args.cache_dir, args.revision)
        print(f"deltaserve: loading {path}", file=sys.stderr, flush=True)
        model, tokenizer = load(path, dtype=args.dtype)
        settings.model_fingerprint = fingerprint(identity(path, model.compute_dtype))
        if settings.num_speculative_tokens and not model.config.mtp_num_hidden_layers:
            raise ValueError(f"--speculative-config: {path} has no MTP weights (mtp_num_hidden_layers is 0; "
                             "a GGUF keeps them as nextn.* tensors)")
    except (ModelSourceError, ModelLoadError, ValueError) as e:
        print(f"deltaserve serve: error: {e}", file=sys.stderr)
        return 1
    return _serve(settings, model, tokenizer)


def _serve(settings, model, tokenizer, lockstep=None) -> int:
    from server.engine import Engine
    from server.engine.core import default_memory_budget

    from .app import create_app
    from .guards import is_loopback
    from .http_server import serve
    from .wired_memory import set_wired_limit

    if not is_loopback(settings.host) and not settings.api_key:
        logging.getLogger("deltaserve").warning("listening on %s without --api-key", settings.host)
    set_wired_limit(model, settings.memory_budget_bytes or default_memory_budget())
    engine = Engine(model, tokenizer, settings.engine_config(), lockstep)
    try:
        app = create_app(settings, engine, tokenizer, warm_up=True)  # /health says ok once it is over
        print(f"deltaserve: serving {', '.join(settings.served_model_names)} on "
              f"http://{settings.host}:{settings.port}/v1 (warming up)", file=sys.stderr, flush=True)
        serve(app, settings, engine)  # returns after a SIGTERM/SIGINT and the drain
    finally:
        engine.shutdown()
    # MLX used from the engine thread can abort the interpreter's normal exit (ml-explore/mlx#3126)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="Qwen3.5 hybrid models on MLX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    register_serve(sub)
    register_convert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers announces at import that PyTorch is missing; a runtime install never needs it
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
