"""Through each HTTP server on the same checkpoint: `mlx_lm.server` vs `deltaserve serve`.

1. aggregate streamed tokens/s with N concurrent chat streams;
2. time to first token: a cold long prompt, the same prompt again, and turn 6 of a chat whose
   every turn appends the assistant's answer and a new user message.
The load generator runs in its own process (this one) with asyncio + httpx; each server runs
alone in a subprocess, one after the other.

    python -m bench.server_speed --model tiny --streams 1,4,16,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlx.core as mx

from bench.common import checkpoint, finish
from fixtures.ports import free_port

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def as_float32(path: Path) -> Path:
    """A copy of the checkpoint whose float tensors are float32 (quantised weights stay as they
    are): mlx_lm.server computes in the dtype the weights come in, deltaserve in float32 on the CPU
    backend, so a bf16 checkpoint would compare bf16 arithmetic on the CPU (slow) with float32."""
    out = path.with_name(path.name + "-float32")
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(path, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    for f in path.glob("*.safetensors"):
        weights = {k: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in mx.load(str(f)).items()}
        mx.save_safetensors(str(tmp / f.name), weights, {"format": "mlx"})
    tmp.rename(out)
    return out


def start(kind: str, model: Path, port: int) -> subprocess.Popen:
    if kind == "mlx-lm":
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(port),
               "--temp", "0", "--decode-concurrency", "64", "--prompt-concurrency", "8"]
    else:
        cmd = [sys.executable, "-m", "server.cli", "serve", str(model), "--port", str(port), "--max-num-seqs", "64"]
    return launch(cmd, port, f"{kind} server", timeout=300)


def launch(cmd: list[str], port: int, what: str, timeout: float = 600) -> subprocess.Popen:
    """Starts a server in its own process group and waits until it answers /v1/models; raises
    RuntimeError with its stderr's tail when it exits first or does not answer in time."""
    err = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            err.seek(0)
            raise RuntimeError(f"{what}: exited before serving: {err.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"{what}: did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


async def _open(client: httpx.AsyncClient, url: str, body: dict, attempts: int = 20) -> httpx.Response:
    """The streamed response, once its headers are in. mlx_lm.server listens with Python's
    socketserver backlog of 5, so with 16 clients connecting at once some connections are reset
    before any reply; a client would retry those, and so does this (the time counts)."""
    for attempt in range(attempts):
        try:
            response = await client.send(client.build_request("POST", url, json=body, timeout=600), stream=True)
        except (httpx.ReadError, httpx.ConnectError, httpx.RemoteProtocolError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
            continue
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            response.raise_for_status()
        return response
    raise AssertionError("unreachable")


async def chat(client: httpx.AsyncClient, url: str, messages, max_tokens: int, sampling: dict | None = None):
    """Streams one chat completion; returns (ttft seconds, completion tokens, answer text). Tokens
    are the usage's count (stream_options.include_usage), not chunks: a chunk may carry several.
    No "model" field: each server then uses the one it loaded."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "chat_template_kwargs": {"enable_thinking": False},
            **(sampling or {})}
    t0 = time.perf_counter()
    ttft, tokens, answer = None, 0, []
    r = await _open(client, url, body)
    try:
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if not event.get("choices"):
                continue
            d = event["choices"][0].get("delta", {})
            piece = (d.get("content") or "") + (d.get("reasoning_content") or d.get("reasoning") or "")
            if piece:
                ttft = ttft or time.perf_counter() - t0
                answer.append(d.get("content") or "")
    finally:
        await r.aclose()
    return ttft, tokens, "".join(answer)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(port: int, pid: int, streams: list[int], prompt_words: int, max_tokens: int, long_words: int,
                  seed: int, sampling: dict | None = None, ttft: bool = True):
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rng = random.Random(seed)
    out = {}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as client:
        await chat(client, url, [{"role": "user", "content": "warm up"}], 4)
        for n in streams:
            msgs = [[{"role": "user", "content": text(rng, prompt_words)}] for _ in range(n)]
            t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
            results = await asyncio.gather(*(chat(client, url, m, max_tokens, sampling) for m in msgs))
            tokens = sum(r[1] for r in results)
            out[f"streams_{n}"] = tokens / (time.perf_counter() - t0)
            # the server's CPU per token: on a shared machine its time slices vary, its work less
            out[f"cpu_{n}"] = (cpu_seconds(pid) - cpu0) / max(tokens, 1)
        if not ttft:
            return out
        long = [{"role": "user", "content": text(rng, long_words)}]
        out["ttft_cold"] = (await chat(client, url, long, 8))[0]
        out["ttft_repeat"] = (await chat(client, url, long, 8))[0]
        convo = [{"role": "system", "content": text(rng, long_words // 2)}]
        for turn in range(6):
            convo.append({"role": "user", "content": text(rng, 30)})
            ttft, _, answer = await chat(client, url, convo, 16)
            convo.append({"role": "assistant", "content": answer})
        out["ttft_turn6"] = ttft
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--streams", default="1,4,16,32")
    ap.add_argument("--prompt-words", type=int, default=60)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--long-words", type=int, default=1500)
    ap.add_argument("--float32", action="store_true", help="serve a float32 copy of the checkpoint (see as_float32)")
    ap.add_argument("--sampling", default="", help='e.g. "temperature=0.7,top_p=0.8,top_k=20" (default: greedy)')
    ap.add_argument("--no-ttft", action="store_true", help="measure the streams only")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    sampling = {k: (int(v) if k == "top_k" else float(v))
                for k, v in (item.split("=") for item in args.sampling.split(",") if item)}
    path = as_float32(checkpoint(args.model)) if args.float32 else checkpoint(args.model)
    config = json.loads((path / "config.json").read_text())
    context = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    long_words = min(args.long_words, context // 4) if context else args.long_words  # fits small models
    streams = [int(x) for x in args.streams.split(",") if x]
    measured = {}
    for kind in ("mlx-lm", "deltaserve"):
        port = free_port()
        proc = start(kind, path, port)
        try:
            measured[kind] = asyncio.run(measure(port, proc.pid, streams, args.prompt_words, args.tokens, long_words, 0,
                                                   sampling, not args.no_ttft))
        finally:
            stop(proc)
    results = []
    for key in measured["deltaserve"]:
        ours, theirs = measured["deltaserve"][key], measured["mlx-lm"][key]
        if key.startswith("cpu_"):
            continue
        if key.startswith("streams"):
            n = key.split("_")[1]
            results.append({"bench": f"http_{key}", "ours_tok_s": ours, "mlx_lm_tok_s": theirs, "ratio": ours / theirs,
                            "ours_cpu_ms_per_tok": 1000 * measured["deltaserve"][f"cpu_{n}"],
                            "mlx_lm_cpu_ms_per_tok": 1000 * measured["mlx-lm"][f"cpu_{n}"]})
        else:
            results.append({"bench": f"http_{key}", "ours_s": ours, "mlx_lm_s": theirs, "ratio": theirs / ours})
    for r in results:
        if "ours_cpu_ms_per_tok" in r:
            print(f"{r['bench']:>18}: server CPU per token: deltaserve {r['ours_cpu_ms_per_tok']:.1f} ms, "
                  f"mlx-lm {r['mlx_lm_cpu_ms_per_tok']:.1f} ms")
    if not args.no_ttft:
        results[-1]["ours_vs_cold"] = measured["deltaserve"]["ttft_turn6"] / measured["deltaserve"]["ttft_cold"]
    meta = {"model": args.model, **({"dtype": "float32"} if args.float32 else {}),
            **({"sampling": args.sampling} if args.sampling else {})}
    return finish(results, meta, args.out)


if __name__ == "__main__":
    main()
