"""Long agent sessions (issue 33), over HTTP, each server alone in a subprocess:

1. agent: a multi-turn coding-agent conversation on the demo model (a system prompt with tool
   definitions, a file's contents in every user turn): the prefix cache's bytes against the
   conversation's whole state (KV + recurrent + conv) after each turn, and each later turn's time to
   first token against a cold prefill of the same prompt; one long single prompt's snapshot bytes.
2. mixed: one long request decoding beside short ones: MLX's active memory increase against the KV
   their lengths need, and the decode step time against the same rows at equal lengths.
3. peers: through /v1/completions on the 152k-vocabulary fixture (`tiny`), deltaserve, mlx_lm.server and
   vllm-mlx one after the other: a repeated prompt, the same prompt extended by a few words, and a new
   question after a shared prefix, each as a fraction of a cold prefill.
4. disk: time to first token of a long prompt after a restart with --prefix-cache-dir, against cold.

State sizes come from config.json (first principles), not from the engine: KV per token is
full-attention layers x 2 x KV heads x head dim x dtype size; a sequence's fixed state is, per
GatedDeltaNet layer, the conv window (kernel - 1 positions of q, k and v) plus the float32 recurrent
state (value heads x key dim x value dim).

    python -m bench.long_context                      # CPU sizes, every part
    python -m bench.long_context --parts agent,mixed --label after
    python -m bench.long_context --vllm-mlx-python /tmp/vllm-mlx-venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import backend, checkpoint
from bench.server_speed import WORDS, stop
from bench.server_speed import launch as serve
from fixtures.ports import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results.jsonl"
PARTS = ("agent", "mixed", "peers", "disk")

TOOLS = [
    {"type": "function", "function": {
        "name": name, "description": desc,
        "parameters": {"type": "object", "properties": {p: {"type": "string", "description": d} for p, d in params},
                       "required": [params[0][0]]}}}
    for name, desc, params in [
        ("read_file", "Read a file of the repository and return its contents with line numbers. Use it before "
         "editing a file, and read only the files the task needs.",
         [("path", "path of the file, relative to the repository root"), ("start", "first line to read"),
          ("end", "last line to read")]),
        ("write_file", "Replace a file's contents. The whole new contents must be given; partial writes are "
         "refused. Keep the file's style and its imports in order.",
         [("path", "path of the file, relative to the repository root"), ("contents", "the new contents")]),
        ("run_tests", "Run the test suite or one test file and return the last lines of its output, with the "
         "failing tests' names and tracebacks.",
         [("target", "a test file or node id; empty for the whole suite"), ("flags", "extra pytest flags")]),
    ]
]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def source_file(rng: random.Random, lines: int) -> str:
    """Python-looking file contents, as a read_file tool would return them."""
    out = []
    for i in range(lines):
        a, b, c = rng.choice(WORDS), rng.choice(WORDS), rng.choice(WORDS)
        out.append(rng.choice([f"def {a}_{b}({c}):", f"    {a} = {b}.{c}({rng.randint(0, 99)})",
                               f"    return {a} + {c}", f"    if {a} > {b}:", f"        {c}.append({a})",
                               f"# {words(rng, 6)}", f"class {a.title()}{b.title()}:"]))
    return "\n".join(f"{i + 1:4d}  {line}" for i, line in enumerate(out))


def system_prompt(rng: random.Random, n_words: int) -> str:
    rules = [f"- {words(rng, 12)}." for _ in range(n_words // 12)]
    return ("You are a coding agent working in a Python repository. Read the files you need with the tools, make "
            "small changes, run the tests after every change and report what you did.\n\nRules:\n" + "\n".join(rules))


# ---- state sizes from config.json ----

def state_sizes(path: Path) -> tuple[int, int]:
    """(KV bytes per token, fixed bytes per sequence) in the dtype the server computes in."""
    from model import load_model

    dsize = load_model(path).compute_dtype.size  # the loader picks it per backend; everything else is config
    c = json.loads((path / "config.json").read_text())
    c = c.get("text_config", c)
    types = c.get("layer_types") or [
        "full_attention" if (i + 1) % c["full_attention_interval"] == 0 else "linear_attention"
        for i in range(c["num_hidden_layers"])]
    n_full, n_lin = types.count("full_attention"), types.count("linear_attention")
    kv = n_full * 2 * c["num_key_value_heads"] * c["head_dim"] * dsize
    conv = (c["linear_conv_kernel_dim"] - 1) * (2 * c["linear_num_key_heads"] * c["linear_key_head_dim"]
                                                + c["linear_num_value_heads"] * c["linear_value_head_dim"]) * dsize
    recurrent = c["linear_num_value_heads"] * c["linear_key_head_dim"] * c["linear_value_head_dim"] * 4
    return kv, n_lin * (conv + recurrent)


# ---- servers ----

def launch(cmd: list[str], port: int, what: str, optional: bool = False) -> subprocess.Popen | None:
    """Starts a server. One that exits before answering ends the run with its reason, or when `optional`
    prints it and returns None."""
    try:
        return serve(cmd, port, what)
    except RuntimeError as e:
        if not optional:
            raise SystemExit(str(e))
        print(f"  {e}")
        return None


def deltaserve(model: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "server.cli", "serve", str(model), "--port", str(port), "--max-num-seqs", "64",
            *extra]


async def stream(client: httpx.AsyncClient, url: str, body: dict, stop_after: asyncio.Event | None = None,
                 started: asyncio.Event | None = None) -> dict:
    """Streams one request at temperature 0; returns its time to first token, each token's arrival time,
    text, tool calls and usage. `started` is set at the first token; once `stop_after` is set, the stream
    is closed (the request cancelled) at its next token."""
    body = {**body, "stream": True, "temperature": 0.0}
    t0 = time.perf_counter()
    times, text, usage, calls = [], [], None, {}
    async with client.stream("POST", url, json=body, timeout=1800) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            usage = chunk.get("usage") or usage
            for c in chunk.get("choices") or []:
                d = c.get("delta") or {}
                piece = c.get("text") if "text" in c else (d.get("content") or d.get("reasoning_content")
                                                            or d.get("reasoning") or "")
                # a completions chunk is a token even when its text is held back (a partial UTF-8 character)
                if piece or "text" in c or d.get("tool_calls"):
                    times.append(time.perf_counter())
                    text.append(d.get("content") or c.get("text") or "")
                    if started is not None:
                        started.set()
                for tc in d.get("tool_calls") or []:
                    call = calls.setdefault(tc.get("index", 0), {"id": "", "type": "function",
                                                                 "function": {"name": "", "arguments": ""}})
                    call["id"] = tc.get("id") or call["id"]
                    for k in ("name", "arguments"):
                        call["function"][k] += (tc.get("function") or {}).get(k) or ""
            if stop_after is not None and stop_after.is_set():
                break
    return {"ttft": times[0] - t0 if times else None, "times": times, "text": "".join(text), "usage": usage,
            "tool_calls": [calls[i] for i in sorted(calls)]}


async def metrics(client: httpx.AsyncClient, port: int) -> dict[str, float]:
    r = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
    out = {}
    for line in r.text.splitlines():
        if line.startswith("deltaserve_") and " " in line and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("deltaserve_")] = float(value)
    return out


async def settled_metrics(client: httpx.AsyncClient, port: int) -> dict[str, float]:
    """/metrics once the engine has published the stats of its last step (it does every 50 ms when idle)."""
    await asyncio.sleep(0.3)
    return await metrics(client, port)


# ---- 1. agent conversation ----

def agent_turns(rng: random.Random, turns: int, system_words: int, file_lines: int) -> tuple[list[dict], list[str]]:
    """The system message and each turn's new text: a file's contents and an instruction."""
    system = [{"role": "system", "content": system_prompt(rng, system_words)}]
    users = []
    for t in range(turns):
        path = f"src/{rng.choice(WORDS)}_{t}.py"
        users.append(f"{path}:\n```python\n{source_file(rng, file_lines)}\n```\n"
                     f"{words(rng, 20)}. Fix the failing test in {path}.")
    return system, users


def next_messages(previous: dict | None, text: str) -> list[dict]:
    """The turn's new text as the results of the tool calls the model just made, or as a user message."""
    calls = (previous or {}).get("tool_calls")
    if not calls:
        return [{"role": "user", "content": text}]
    return [{"role": "tool", "tool_call_id": c["id"], "content": text if i == 0 else "done"}
            for i, c in enumerate(calls)]


def chat_body(messages: list[dict], max_tokens: int) -> dict:
    return {"messages": messages, "tools": TOOLS, "max_tokens": max_tokens,
            "stream_options": {"include_usage": True}, "chat_template_kwargs": {"enable_thinking": False}}


async def agent_warm(client, url, port, args, system, users, kv, fixed) -> tuple[list[dict], list[list[dict]]]:
    """Runs the conversation on a caching server; returns per turn (tokens, cache bytes, ttft) and each
    turn's messages (to replay cold)."""
    rows, prompts = [], []
    messages = list(system)
    base = (await settled_metrics(client, port)).get("prefix_cache_bytes", 0)
    for t, user in enumerate(users):
        messages += next_messages(messages[-1] if t else None, user)
        prompts.append(list(messages))
        r = await stream(client, url, chat_body(messages, args.answer_tokens))
        messages.append({"role": "assistant", "content": r["text"], **({"tool_calls": r["tool_calls"]}
                                                                         if r["tool_calls"] else {})})
        m = await settled_metrics(client, port)
        tokens = r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
        hit = (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        state = kv * tokens + fixed
        cache = m["prefix_cache_bytes"] - base
        rows.append({"turn": t + 1, "tokens": tokens, "prompt_tokens": r["usage"]["prompt_tokens"], "hit_tokens": hit,
                     "tool_calls": len(r["tool_calls"]), "cache_bytes": cache, "entries": m["prefix_cache_entries"],
                     "state_bytes": state, "cache_over_state": cache / state, "ttft": r["ttft"]})
    return rows, prompts


async def single_prompt(client, url, port, n_words: int, kv: int, fixed: int) -> dict:
    rng = random.Random(7)
    body = {"prompt": words(rng, n_words), "max_tokens": 1, "stream_options": {"include_usage": True}}
    r = await stream(client, url.replace("chat/completions", "completions"), body)
    m = await settled_metrics(client, port)
    tokens = r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    state = kv * tokens + fixed
    return {"tokens": tokens, "cache_bytes": m["prefix_cache_bytes"], "entries": m["prefix_cache_entries"],
            "state_bytes": state, "cache_over_state": m["prefix_cache_bytes"] / state}


def run_agent(args, model: Path, kv: int, fixed: int) -> list[dict]:
    rng = random.Random(0)
    system, users = agent_turns(rng, args.turns, args.system_words, args.file_lines)

    async def warm(port):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with httpx.AsyncClient() as client:
            return await agent_warm(client, url, port, args, system, users, kv, fixed)

    async def cold(port, prompts):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with httpx.AsyncClient() as client:
            await stream(client, url, chat_body([{"role": "user", "content": "warm up"}], 2))
            return [(await stream(client, url, chat_body(p, 1)))["ttft"] for p in prompts]

    async def single(port):
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with httpx.AsyncClient() as client:
            return await single_prompt(client, url, port, args.single_words, kv, fixed)

    results = []
    port = free_port()
    proc = launch(deltaserve(model, port), port, "deltaserve")
    try:
        one = asyncio.run(single(port))
    finally:
        stop(proc)
    print(f"  one {one['tokens']}-token prompt: cache {one['cache_bytes'] / 1e6:.2f} MB in {one['entries']:.0f} "
          f"snapshots, {one['cache_over_state']:.2f}x its state ({one['state_bytes'] / 1e6:.2f} MB)")
    results.append({"bench": f"long_single_{one['tokens']}", "ours_mb": one["cache_bytes"] / 1e6,
                    "state_mb": one["state_bytes"] / 1e6, "cache_over_state": one["cache_over_state"],
                    "entries": one["entries"], "tokens": one["tokens"]})

    port = free_port()
    proc = launch(deltaserve(model, port), port, "deltaserve")
    try:
        turns, prompts = asyncio.run(warm(port))
    finally:
        stop(proc)
    port = free_port()
    proc = launch(deltaserve(model, port, "--no-enable-prefix-cache"), port, "deltaserve (no prefix cache)")
    try:
        colds = asyncio.run(cold(port, prompts))
    finally:
        stop(proc)
    print(f"  {'turn':>4} {'tokens':>6} {'hit':>5} {'cache MB':>9} {'entries':>7} {'state MB':>8} {'cache/state':>11} "
          f"{'ttft ms':>8} {'cold ms':>8} {'of cold':>7} {'calls':>5}")
    for row, c in zip(turns, colds):
        row["cold_ttft"], row["of_cold"] = c, row["ttft"] / c
        print(f"  {row['turn']:>4} {row['tokens']:>6} {row['hit_tokens']:>5} {row['cache_bytes'] / 1e6:>9.2f} "
              f"{row['entries']:>7.0f} {row['state_bytes'] / 1e6:>8.2f} {row['cache_over_state']:>10.2f}x "
              f"{row['ttft'] * 1000:>8.0f} {c * 1000:>8.0f} {row['of_cold']:>6.2f}x {row['tool_calls']:>5}")
    later = [r["of_cold"] for r in turns[1:]]
    last = turns[-1]
    results.append({"bench": "long_agent", "turns": turns, "tokens": last["tokens"],
                    "ours_mb": last["cache_bytes"] / 1e6, "state_mb": last["state_bytes"] / 1e6,
                    "cache_over_state": last["cache_over_state"],
                    "of_cold_median": statistics.median(later), "of_cold_worst": max(later)})
    print(f"  after {last['tokens']} tokens: cache {last['cache_over_state']:.1f}x the state; later turns' TTFT "
          f"{statistics.median(later):.2f}x (median) to {max(later):.2f}x (worst) of cold")
    return results


# ---- 2. mixed lengths ----

async def batch(client, port: int, bodies: list[dict], first: dict | None, kv: int, fixed: int, count) -> dict:
    """`first` (if any) starts alone; once it streams, `bodies` start together. While all rows decode,
    /metrics is sampled; returns the decode step time and the memory seen then. `count(prompt)`: its tokens."""
    url = f"http://127.0.0.1:{port}/v1/completions"
    idle = (await settled_metrics(client, port))["mlx_active_memory_bytes"]
    done = asyncio.Event()
    lead = None
    if first is not None:
        decoding = asyncio.Event()
        lead = asyncio.create_task(stream(client, url, first, stop_after=done, started=decoding))
        await decoding.wait()
    tasks = [asyncio.create_task(stream(client, url, b)) for b in bodies]
    samples = []
    while not all(t.done() for t in tasks):
        m = await metrics(client, port)
        samples.append(m)
        await asyncio.sleep(0.1)
    done.set()
    rows = [await t for t in tasks]
    if lead is not None:
        rows.insert(0, await lead)
        bodies = [first, *bodies]
    start = max(r["times"][0] for r in rows)
    end = min(r["times"][-1] for r in rows)
    steps = [sum(start <= x <= end for x in r["times"]) - 1 for r in rows]
    full = [s for s in samples if s.get("num_requests_running") == len(rows)] or samples
    tokens = [count(b["prompt"]) + sum(x <= end for x in r["times"]) for b, r in zip(bodies, rows)]
    need = sum(kv * t + fixed for t in tokens)
    return {"rows": len(rows), "step_s": (end - start) / max(1, min(steps)), "tokens": tokens,
            "need_bytes": need, "active_increase": max(s["mlx_active_memory_bytes"] for s in full) - idle,
            "sequence_bytes": max(s.get("sequence_state_bytes", 0) for s in full),
            "reserved_bytes": max(s.get("reserved_bytes", 0) for s in full), "samples": len(full)}


def run_mixed(args, model: Path, kv: int, fixed: int) -> list[dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    def count(prompt: str) -> int:  # a cancelled stream reports no usage
        return len(tokenizer(prompt)["input_ids"])

    rng = random.Random(1)
    long_body = {"prompt": words(rng, args.long_words), "max_tokens": args.long_decode, "ignore_eos": True,
                 "stream_options": {"include_usage": True}}
    shorts = [{"prompt": words(rng, args.short_words), "max_tokens": args.short_decode, "ignore_eos": True,
               "stream_options": {"include_usage": True}} for _ in range(args.rows - 1)]
    even_words = (args.long_words + (args.rows - 1) * args.short_words) // args.rows
    evens = [{"prompt": words(rng, even_words), "max_tokens": args.short_decode, "ignore_eos": True,
              "stream_options": {"include_usage": True}} for _ in range(args.rows)]

    async def both(port):
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
            await stream(client, f"http://127.0.0.1:{port}/v1/completions", {"prompt": "warm up", "max_tokens": 2})
            runs = {"mixed": [], "even": []}
            for _ in range(args.repeats):  # alternated, so that the shared machine's load falls on both alike
                runs["mixed"].append(await batch(client, port, shorts, long_body, kv, fixed, count))
                runs["even"].append(await batch(client, port, evens, None, kv, fixed, count))
            return runs

    port = free_port()
    proc = launch(deltaserve(model, port, "--no-enable-prefix-cache"), port, "deltaserve (no prefix cache)")
    try:
        runs = asyncio.run(both(port))
    finally:
        stop(proc)
    out = []
    for name, rs in runs.items():
        r = max(rs, key=lambda x: x["active_increase"])  # memory: the worst run; step time: the median
        r.update(step_s=statistics.median(x["step_s"] for x in rs), step_runs_s=[x["step_s"] for x in rs])
        r["active_over_need"] = r["active_increase"] / r["need_bytes"]
        print(f"  {name}: {r['rows']} rows of {min(r['tokens'])}-{max(r['tokens'])} tokens: MLX active +"
              f"{r['active_increase'] / 1e6:.1f} MB, sequences {r['sequence_bytes'] / 1e6:.1f} MB, their lengths "
              f"need {r['need_bytes'] / 1e6:.2f} MB ({r['active_over_need']:.1f}x); decode step "
              f"{r['step_s'] * 1000:.0f} ms (median of {', '.join(f'{x * 1000:.0f}' for x in r['step_runs_s'])} ms)")
        out.append({"bench": f"long_batch_{name}", **r})
    out[0]["step_over_even"] = out[0]["step_s"] / out[1]["step_s"]
    print(f"  mixed step / equal-length step: {out[0]['step_over_even']:.2f}x")
    return out


# ---- 3. peers on /v1/completions ----

def peer_command(kind: str, model: Path, port: int, vllm_python: str | None) -> list[str] | None:
    if kind == "deltaserve":
        return deltaserve(model, port)
    if kind == "mlx-lm":
        return [sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(port), "--temp", "0"]
    if not vllm_python or not Path(vllm_python).exists():
        return None
    # its caching path: continuous batching with the prefix cache on (the default serves one request at a time)
    return [str(Path(vllm_python).parent / "vllm-mlx"), "serve", str(model), "--port", str(port),
            "--continuous-batching", "--enable-prefix-cache"]


async def peer_cases(port: int, args) -> dict:
    """TTFT of a cold prompt, then the same again, then extended, then a new question after its prefix."""
    rng = random.Random(2)
    url = f"http://127.0.0.1:{port}/v1/completions"

    def ttft(client, prompt):
        return stream(client, url, {"prompt": prompt, "max_tokens": 2, **({"model": name} if name else {})})

    async with httpx.AsyncClient() as client:
        try:  # vllm-mlx needs a model name in each request; mlx_lm.server's list is empty
            name = (await client.get(f"http://127.0.0.1:{port}/v1/models")).json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError):
            name = None
        await ttft(client, "warm up " + words(rng, 50))
        colds = []
        for _ in range(2):  # two different prompts; cold is the faster (the machine's load only slows)
            shared = words(rng, args.peer_words)
            prompt = f"{shared}\nQuestion: {words(rng, 12)}?\nAnswer:"
            colds.append((await ttft(client, prompt))["ttft"])
        cold = min(colds)
        out = {"cold": cold, "repeat": (await ttft(client, prompt))["ttft"]}
        out["extend"] = (await ttft(client, f"{prompt} {words(rng, 5)}"))["ttft"]
        out["new_question"] = (await ttft(client, f"{shared}\nQuestion: {words(rng, 12)}?\nAnswer:"))["ttft"]
    return out


def run_peers(args) -> list[dict]:
    model = checkpoint(args.peer_model)
    measured = {}
    for kind in ("deltaserve", "mlx-lm", "vllm-mlx"):
        port = free_port()
        cmd = peer_command(kind, model, port, args.vllm_mlx_python)
        if cmd is None:
            print(f"  {kind}: skipped (no --vllm-mlx-python, or {args.vllm_mlx_python} is absent)")
            continue
        proc = launch(cmd, port, kind, optional=True)
        if proc is None:
            continue
        try:
            measured[kind] = asyncio.run(peer_cases(port, args))
        except (httpx.HTTPError, RuntimeError, ValueError) as e:
            print(f"  {kind}: failed: {e}")
        finally:
            stop(proc)
    kinds = list(measured)
    print("  " + f"{'case':>14}" + "".join(f"{k:>22}" for k in kinds))
    out = []
    for case in ("cold", "repeat", "extend", "new_question"):
        cells = []
        for k in kinds:
            s = measured[k][case]
            cells.append(f"{s * 1000:8.0f} ms" + (f" {s / measured[k]['cold']:6.2f}x" if case != "cold" else " " * 8))
        print("  " + f"{case:>14}" + "".join(f"{c:>22}" for c in cells))
        if "deltaserve" in measured:
            row = {"bench": f"long_peer_{case}", "model": args.peer_model, "peer_words": args.peer_words}
            for k in kinds:
                key = k.replace("-", "_")
                row[f"{key}_s"] = measured[k][case]
                row[f"{key}_of_cold"] = measured[k][case] / measured[k]["cold"]
            row["ours_s"] = row.pop("deltaserve_s")
            row["ours_of_cold"] = row.pop("deltaserve_of_cold")
            out.append(row)
    return out


# ---- 4. disk tier ----

def run_disk(args, model: Path) -> list[dict]:
    rng = random.Random(3)
    prompt = words(rng, args.single_words)
    url = "http://127.0.0.1:{}/v1/completions"

    async def one(port):
        async with httpx.AsyncClient() as client:
            await stream(client, url.format(port), {"prompt": "warm up", "max_tokens": 2})
            r = await stream(client, url.format(port), {"prompt": prompt, "max_tokens": 2})
            await asyncio.sleep(2)  # the disk tier writes in the background
            return r["ttft"], await metrics(client, port)

    with tempfile.TemporaryDirectory(prefix="long-context-disk-") as d:
        times = []
        for _ in range(2):
            port = free_port()
            proc = launch(deltaserve(model, port, "--prefix-cache-dir", d), port, "deltaserve --prefix-cache-dir",
                          optional=True)
            if proc is None:
                print("  disk: skipped (this server has no --prefix-cache-dir)")
                return []
            try:
                times.append(asyncio.run(one(port)))
            finally:
                stop(proc)
        files = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    (cold, _), (restart, m) = times
    disk = {k: v for k, v in m.items() if "disk" in k}
    print(f"  cold {cold * 1000:.0f} ms, after a restart {restart * 1000:.0f} ms ({restart / cold:.2f}x); "
          f"{files / 1e6:.1f} MB on disk; {disk}")
    return [{"bench": "long_disk_restart", "ours_s": restart, "cold_s": cold, "of_cold": restart / cold,
             "disk_bytes": files, "disk_metrics": disk}]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    ap.add_argument("--model", default="demo", help="model of the agent, mixed and disk parts")
    ap.add_argument("--peer-model", default="tiny", help="model of the peers part (tiny: the 152k-vocab fixture)")
    ap.add_argument("--turns", type=int, default=9)
    ap.add_argument("--system-words", type=int, default=12)
    ap.add_argument("--file-lines", type=int, default=5)
    ap.add_argument("--answer-tokens", type=int, default=16)
    ap.add_argument("--single-words", type=int, default=1130, help="words of the single long prompt")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--long-words", type=int, default=1000)
    ap.add_argument("--long-decode", type=int, default=400)
    ap.add_argument("--short-words", type=int, default=40)
    ap.add_argument("--short-decode", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3, help="runs of the mixed and the equal-length batch")
    ap.add_argument("--peer-words", type=int, default=525)
    ap.add_argument("--vllm-mlx-python", default=None, help="python of a venv with vllm-mlx installed")
    ap.add_argument("--label", default="", help="recorded with each row, e.g. before / after")
    ap.add_argument("--out", type=Path, default=RESULTS, help="JSON lines appended here ('-': none)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--parts: unknown {', '.join(bad)} (choose from {', '.join(PARTS)})")
    for name in (args.model, args.peer_model):
        if name not in ("demo", "tiny", "wide") and not (Path(name) / "config.json").is_file():
            ap.error(f"{name}: not a model directory (no config.json) nor one of demo, tiny, wide")
    model = checkpoint(args.model)
    kv, fixed = state_sizes(model)
    print(f"{args.model}: {kv} B of KV per token, {fixed} B of fixed state per sequence")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    meta = {"suite": "long_context", "label": args.label, "backend": backend(), "commit": commit.stdout.strip(),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    results = []
    for part in parts:
        print(f"[{part}]")
        t0 = time.time()
        if part == "agent":
            rows = run_agent(args, model, kv, fixed)
        elif part == "mixed":
            rows = run_mixed(args, model, kv, fixed)
        elif part == "peers":
            rows = run_peers(args)
        else:
            rows = run_disk(args, model)
        print(f"  ({time.time() - t0:.0f} s)")
        for r in rows:
            r.setdefault("model", args.model)
            r.update(meta)
        if str(args.out) != "-":  # after each part, so that a later part's failure keeps the earlier rows
            with open(args.out, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        results += rows
    return results


if __name__ == "__main__":
    main()
