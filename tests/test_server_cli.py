"""`deltaserve serve` as users run it: the seed's flags in a subprocess, config files, model sources."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from fixtures import get_fixture
from fixtures.ports import free_port
from server_harness import wait_until

from server.cli import _apply_config, build_parser, parse_size, settings_from_args
from server.model_source import ModelSourceError, first_gguf_part, resolve_model

REPO = Path(__file__).resolve().parents[1]
SEED_FLAGS = ["--max-tokens", "8192", "--continuous-batching", "--enable-prefix-cache",
              "--enable-auto-tool-choice", "--tool-call-parser", "qwen3"]


def cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "server.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def wait_healthy(proc, port: int, timeout: float = 180) -> bool:
    """Until /health answers 200 (it answers 503 while the server warms up); False if the server died."""
    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return proc.poll() is not None  # stop waiting if it died

    return wait_until(healthy, timeout=timeout, interval=0.5) and proc.poll() is None


def test_serve_subprocess_with_the_seed_flags():
    port = free_port()
    proc = cli("serve", str(get_fixture("moe_r4").hf_dir), "--port", str(port), "--host", "127.0.0.1", *SEED_FLAGS,
               "--api-key", "k", "--served-model-name", "tiny", "--max-model-len", "1024", "--dtype", "float32",
               "--log-level", "warning")
    try:
        assert wait_healthy(proc, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], tools=tools,
                                           max_tokens=4)
        assert r.usage.completion_tokens <= 4
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert f"serving tiny on http://127.0.0.1:{port}/v1" in out


def test_missing_model_path_exits_nonzero(tmp_path):
    proc = cli("serve", str(tmp_path / "nope"), "--port", str(free_port()))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "no such file or directory" in out


def test_seed_command_script_converts_on_first_start_and_reuses_on_second(tmp_path):
    gguf = get_fixture("moe_r4").gguf_path()
    env = {**os.environ, "PORT": str(free_port()), "HOST": "127.0.0.1", "CACHE_DIR": str(tmp_path),
           "DELTASERVE": f"{sys.executable} -m server.cli",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(["bash", str(REPO / "bench" / "seed_command.sh"), str(gguf)], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "OK: converted on the first start, reused unchanged on the second" in run.stdout
    assert "cache entries: 1" in run.stdout


def test_config_file_fills_defaults_and_flags_win(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("max-num-seqs: 3\nport: 9000\nreasoning_parser: none\n"
                      "chat-template-kwargs:\n  enable_thinking: false\n")
    args = build_parser().parse_args(["serve", "m", "--config", str(config), "--port", "8123"])
    _apply_config(args)
    s = settings_from_args(args)
    assert (s.max_num_seqs, s.port, s.reasoning_parser) == (3, 8123, None)
    assert s.chat_template_kwargs == {"enable_thinking": False}
    assert s.served_model_names == ["m"] and s.host == "127.0.0.1"


def test_config_file_with_unknown_option_is_refused(tmp_path):
    config = tmp_path / "serve.toml"
    config.write_text('max_num_seqz = 3\n')
    args = build_parser().parse_args(["serve", "--config", str(config)])
    with pytest.raises(ValueError, match="max_num_seqz"):
        _apply_config(args)


def test_example_config_is_valid():
    args = build_parser().parse_args(["serve", "--config", str(REPO / "configs" / "serve.example.yaml")])
    _apply_config(args)
    assert settings_from_args(args).enable_auto_tool_choice


def test_no_continuous_batching_runs_one_sequence_at_a_time():
    args = build_parser().parse_args(["serve", "--no-continuous-batching", "--max-num-seqs", "8"])
    assert settings_from_args(args).engine_config().max_num_seqs == 1


@pytest.mark.parametrize("text,value", [("8G", 8 << 30), ("512MiB", 512 << 20), ("1024", 1024), ("1.5k", 1536)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_model_sources(tmp_path):
    hf = get_fixture("moe_r4").hf_dir
    assert resolve_model(str(hf)) == hf
    with pytest.raises(ModelSourceError, match="not a GGUF"):
        resolve_model(str(hf / "config.json"))
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model(str(tmp_path))
    for i in (1, 2):
        (tmp_path / f"m-0000{i}-of-00002.gguf").write_bytes(b"GGUF")
    assert first_gguf_part(tmp_path / "m-00002-of-00002.gguf") == tmp_path / "m-00001-of-00002.gguf"


def test_config_values_go_through_the_flag_types(tmp_path):
    config = tmp_path / "serve.json"
    config.write_text('{"prefix-cache-size": "1G", "served-model-name": "one", "cache-dir": "/tmp/x"}')
    args = build_parser().parse_args(["serve", "--config", str(config)])
    _apply_config(args)
    assert (args.prefix_cache_bytes, args.served_model_name, args.cache_dir) == (1 << 30, ["one"], Path("/tmp/x"))


def test_auto_tool_choice_is_on_by_default_and_can_be_turned_off():
    parse = build_parser().parse_args
    assert settings_from_args(parse(["serve"])).enable_auto_tool_choice
    assert settings_from_args(parse(["serve", "--enable-auto-tool-choice"])).enable_auto_tool_choice
    assert not settings_from_args(parse(["serve", "--no-enable-auto-tool-choice"])).enable_auto_tool_choice
