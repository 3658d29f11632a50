"""Engine-level comparison with mlx-lm on the same checkpoint, same process:

1. aggregate decode throughput with N concurrent streams (deltaserve EngineCore vs mlx-lm's
   BatchGenerator), all submitted at once, and one long prompt beside fifteen short ones
   (`--mixed-long`; our decode batch holds and attends over KV per length bucket);
2. time to first token for a long prompt: cold, the same prompt again, that prompt plus 100 new
   tokens, and turn 6 of a chat whose every turn extends the last (deltaserve's prefix cache vs
   mlx-lm's LRUPromptCache used the way mlx_lm.server uses it).

    python -m bench.engine_speed --model tiny --streams 1,4,16,32 --ttft-prompt 2048
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from bench.common import backend, checkpoint, finish, load_both
from server.engine import EngineConfig, EngineCore, SamplingParams


def ours_throughput(core, prompts, max_tokens):
    count = [0]
    core.emit = lambda d: count.__setitem__(0, count[0] + len(d.token_ids))
    start = time.perf_counter()
    for p in prompts:
        core.add(p, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    while core.has_work():
        core.step()
    return count[0] / (time.perf_counter() - start)


def mlx_lm_throughput(model, prompts, max_tokens):
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(model, max_tokens=max_tokens, completion_batch_size=len(prompts),
                         prefill_batch_size=min(8, len(prompts)), stop_tokens=[])
    start = time.perf_counter()
    gen.insert(prompts, [max_tokens] * len(prompts))
    produced, done = 0, 0
    while done < len(prompts):
        _, responses = gen.next()
        for r in responses:
            produced += 1
            done += r.finish_reason is not None
    elapsed = time.perf_counter() - start
    gen.close()
    return produced / elapsed


def ours_ttft(core, prompt, max_tokens=8):
    times, out = [], []

    def emit(d):
        times.append(time.perf_counter())
        out.extend(d.token_ids)

    core.emit = emit
    start = time.perf_counter()
    core.add(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    while core.has_work():
        core.step()
    return times[0] - start, out


def mlx_lm_ttft(model, cache_store, prompt, max_tokens=8):
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    start = time.perf_counter()
    cache, rest = cache_store.fetch_nearest_cache("m", prompt)
    if cache is None:
        cache, rest = make_prompt_cache(model), prompt
    ttft, out = None, []
    for tok, _ in generate_step(mx.array(rest), model, max_tokens=max_tokens, prompt_cache=cache,
                                sampler=lambda x: mx.argmax(x, axis=-1)):
        ttft = ttft or time.perf_counter() - start
        out.append(int(tok))
    cache_store.insert_cache("m", list(prompt) + out, cache)
    return ttft, out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--streams", default="1,4,16,32")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per stream")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per stream")
    ap.add_argument("--ttft-prompt", type=int, default=2048)
    ap.add_argument("--mixed-long", type=int, default=3000, help="the long prompt beside 15 short ones (0: skip)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from mlx_lm.models.cache import LRUPromptCache

    ours, theirs = load_both(checkpoint(args.model))
    vocab = ours.config.vocab_size
    rng = np.random.default_rng(0)
    results = []
    meta = {"model": args.model, "backend": backend(), "dtype": str(ours.compute_dtype)}

    def core(cache_bytes=0):
        return EngineCore(ours, None, EngineConfig(prefix_cache_bytes=cache_bytes, memory_budget_bytes=16 << 30,
                                                   max_num_seqs=256, prefill_tokens_per_step=2048))

    ours_throughput(core(), [rng.integers(0, vocab, 16).tolist()], 4)  # warm up both
    mlx_lm_throughput(theirs, [rng.integers(0, vocab, 16).tolist()], 4)
    for n in [int(x) for x in args.streams.split(",") if x]:
        prompts = [rng.integers(0, vocab, args.prompt).tolist() for _ in range(n)]
        o = ours_throughput(core(), prompts, args.tokens)
        t = mlx_lm_throughput(theirs, prompts, args.tokens)
        results.append({"bench": f"streams_{n}", "ours_tok_s": o, "mlx_lm_tok_s": t, "ratio": o / t})
    if args.mixed_long:
        prompts = [rng.integers(0, vocab, args.mixed_long).tolist()]
        prompts += [rng.integers(0, vocab, args.prompt).tolist() for _ in range(15)]
        o = ours_throughput(core(), prompts, args.tokens)
        t = mlx_lm_throughput(theirs, prompts, args.tokens)
        results.append({"bench": f"streams_{args.mixed_long}+15", "ours_tok_s": o, "mlx_lm_tok_s": t, "ratio": o / t})

    n = args.ttft_prompt
    base = rng.integers(0, vocab, n).tolist()
    c, store = core(1 << 30), LRUPromptCache(max_size=64)
    for label, prompt in (("ttft_cold", base), ("ttft_repeat", base), ("ttft_prefix+100", base + rng.integers(0, vocab, 100).tolist())):
        o, _ = ours_ttft(c, prompt)
        t, _ = mlx_lm_ttft(theirs, store, prompt)
        results.append({"bench": label, "ours_s": o, "mlx_lm_s": t, "ratio": t / o})

    c, store = core(1 << 30), LRUPromptCache(max_size=64)
    p_ours = p_theirs = rng.integers(0, vocab, n // 2).tolist()
    for turn in range(6):
        user = rng.integers(0, vocab, 50).tolist()
        o, out_o = ours_ttft(c, p_ours)
        t, out_t = mlx_lm_ttft(theirs, store, p_theirs)
        p_ours, p_theirs = p_ours + out_o + user, p_theirs + out_t + user
    results.append({"bench": "ttft_turn6", "ours_s": o, "mlx_lm_s": t, "ratio": t / o})
    cold = next(r["ours_s"] for r in results if r["bench"] == "ttft_cold")
    results[-1]["ours_vs_cold"] = o / cold

    return finish(results, meta, args.out)


if __name__ == "__main__":
    main()
