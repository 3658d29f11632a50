"""Resident memory per active sequence: bytes of model state a sequence holds after N tokens,
deltaserve's cache vs mlx-lm's prompt cache, on the same checkpoint (allocated buffers, which is
what the machine pays).

    python -m bench.memory --model wide --tokens 1024,4096
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlx.core as mx
import numpy as np

from bench.common import checkpoint, finish, load_both


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokens", default="1024,4096")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from mlx_lm.models.cache import make_prompt_cache

    ours, theirs = load_both(checkpoint(args.model))
    rng = np.random.default_rng(0)
    results = []
    for n in [int(x) for x in args.tokens.split(",") if x]:
        ids = mx.array(rng.integers(0, ours.config.vocab_size, n))[None]
        cache = ours.make_cache(1)
        for s in range(0, n, 512):
            ours(ids[:, s : s + 512], cache, last_only=True)
            mx.eval(cache.state())
        o = sum(a.nbytes for a in cache.state())
        mcache = make_prompt_cache(theirs)
        for s in range(0, n, 512):
            theirs(ids[:, s : s + 512], cache=mcache)
            mx.eval([c.state for c in mcache])
        t = sum(c.nbytes for c in mcache)
        results.append({"bench": f"memory_{n}", "ours_mb": o / 2**20, "mlx_lm_mb": t / 2**20, "ratio": t / o})
    return finish(results, {"model": args.model, "dtype": str(ours.compute_dtype)}, args.out)


if __name__ == "__main__":
    main()
