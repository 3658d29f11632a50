"""Decode tokens/s at batch 1 and prefill tokens/s: deltaserve's engine vs mlx-lm's generate_step,
same checkpoint, same process, same backend, alternating runs.

    python -m bench.model_speed --model wide --prefill 512,2048
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from bench.common import backend, checkpoint, finish, load_both
from server.engine import EngineConfig, EngineCore, SamplingParams


def ours_generate(model, prompt, max_tokens, prefill_chunk):
    """Returns (time to first token, seconds per later token)."""
    core = EngineCore(model, None, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=16 << 30,
                                                prefill_tokens_per_step=prefill_chunk))
    times = []
    core.emit = lambda d: times.append(time.perf_counter())
    start = time.perf_counter()
    core.add(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    while core.has_work():
        core.step()
    return times[0] - start, (times[-1] - times[0]) / max(len(times) - 1, 1)


def mlx_lm_generate(model, prompt, max_tokens, prefill_chunk):
    from mlx_lm.generate import generate_step

    times = []
    start = time.perf_counter()
    for _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, prefill_step_size=prefill_chunk,
                           sampler=lambda x: mx.argmax(x, axis=-1)):
        times.append(time.perf_counter())
    return times[0] - start, (times[-1] - times[0]) / max(len(times) - 1, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny", help="tiny | wide | path to an MLX checkpoint")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=256)
    ap.add_argument("--prefill", default="512,2048,8192")
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk, both engines")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--uncompiled", action="store_true",
                    help="also decode with the layers' compiled step off (row decode_b1_uncompiled)")
    ap.add_argument("--out", type=Path, default=None, help="append JSON results here")
    args = ap.parse_args(argv)

    ours, theirs = load_both(checkpoint(args.model))
    vocab = ours.config.vocab_size
    rng = np.random.default_rng(0)
    results = []

    def best(prompt, n):
        """The fastest of `repeats` runs of each engine, the two alternating (so that drift in the
        machine's speed hits both alike): ((ttft, s/token) ours, (ttft, s/token) mlx-lm)."""
        runs = [(ours_generate(ours, prompt, n, args.chunk), mlx_lm_generate(theirs, prompt, n, args.chunk))
                for _ in range(args.repeats)]
        return tuple((min(r[k][0] for r in runs), min(r[k][1] for r in runs)) for k in (0, 1))

    prompt = rng.integers(0, vocab, size=args.prompt).tolist()
    best(prompt, 4)  # warm up
    (_, o), (_, t) = best(prompt, args.decode)
    results.append({"bench": "decode_b1", "ours_tok_s": 1 / o, "mlx_lm_tok_s": 1 / t, "ratio": t / o})
    if args.uncompiled:  # the same, without DecoderLayer.step's compiled functions
        ours.compiled_step = False
        (_, o), (_, t) = best(prompt, args.decode)
        ours.compiled_step = True
        results.append({"bench": "decode_b1_uncompiled", "ours_tok_s": 1 / o, "mlx_lm_tok_s": 1 / t, "ratio": t / o})
    for n in [int(x) for x in args.prefill.split(",") if x]:
        prompt = rng.integers(0, vocab, size=n).tolist()
        (o, _), (t, _) = best(prompt, 1)
        results.append({"bench": f"prefill_{n}", "ours_tok_s": n / o, "mlx_lm_tok_s": n / t, "ratio": t / o})

    return finish(results, {"model": args.model, "backend": backend(), "dtype": str(ours.compute_dtype)}, args.out)


if __name__ == "__main__":
    main()
