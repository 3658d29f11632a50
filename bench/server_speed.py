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
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import checkpoint, finish
from fixtures.ports import free_port

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


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


async def chat(client: httpx.AsyncClient, url: str, messages, max_tokens: int):
    """Streams one chat completion; returns (ttft seconds, content chunks, answer text).
    No "model" field: each server then uses the one it loaded."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "chat_template_kwargs": {"enable_thinking": False}}
    t0 = time.perf_counter()
    ttft, chunks, answer = None, 0, []
    async with client.stream("POST", url, json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            delta = json.loads(line[5:])["choices"]
            if not delta:
                continue
            d = delta[0].get("delta", {})
            piece = (d.get("content") or "") + (d.get("reasoning_content") or d.get("reasoning") or "")
            if piece:
                ttft = ttft or time.perf_counter() - t0
                chunks += 1
                answer.append(d.get("content") or "")
    return ttft, chunks, "".join(answer)


async def measure(port: int, streams: list[int], prompt_words: int, max_tokens: int, long_words: int, seed: int):
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rng = random.Random(seed)
    out = {}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=256)) as client:
        await chat(client, url, [{"role": "user", "content": "warm up"}], 4)
        for n in streams:
            msgs = [[{"role": "user", "content": text(rng, prompt_words)}] for _ in range(n)]
            t0 = time.perf_counter()
            results = await asyncio.gather(*(chat(client, url, m, max_tokens) for m in msgs))
            out[f"streams_{n}"] = sum(r[1] for r in results) / (time.perf_counter() - t0)
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
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    path = checkpoint(args.model)
    config = json.loads((path / "config.json").read_text())
    context = config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")
    long_words = min(args.long_words, context // 4) if context else args.long_words  # fits small models
    streams = [int(x) for x in args.streams.split(",") if x]
    measured = {}
    for kind in ("mlx-lm", "deltaserve"):
        port = free_port()
        proc = start(kind, path, port)
        try:
            measured[kind] = asyncio.run(measure(port, streams, args.prompt_words, args.tokens, long_words, 0))
        finally:
            stop(proc)
    results = []
    for key in measured["deltaserve"]:
        ours, theirs = measured["deltaserve"][key], measured["mlx-lm"][key]
        if key.startswith("streams"):
            results.append({"bench": f"http_{key}", "ours_tok_s": ours, "mlx_lm_tok_s": theirs, "ratio": ours / theirs})
        else:
            results.append({"bench": f"http_{key}", "ours_s": ours, "mlx_lm_s": theirs, "ratio": theirs / ours})
    results[-1]["ours_vs_cold"] = measured["deltaserve"]["ttft_turn6"] / measured["deltaserve"]["ttft_cold"]
    return finish(results, {"model": args.model}, args.out)


if __name__ == "__main__":
    main()
