"""Resident memory per active sequence: bytes of model state a sequence holds after N tokens,
deltaserve's cache vs mlx-lm's prompt cache, on the same checkpoint (allocated buffers, which is
what the machine pays).

    python bench/memory.py --model wide --tokens 1024,4096
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import models  # noqa: E402
from model import load_model  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--tokens", default="1024,4096")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model as mlx_lm_load

    path = models.get(args.model) if args.model in ("tiny", "wide") else Path(args.model)
    ours = load_model(path)
    theirs, _ = mlx_lm_load(path)
    theirs.set_dtype(ours.compute_dtype)
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
        r = {"bench": f"memory_{n}", "ours_mb": o / 2**20, "mlx_lm_mb": t / 2**20, "ratio": t / o,
             "model": args.model, "dtype": str(ours.compute_dtype)}
        print(f"{r['bench']:>14}: deltaserve {r['ours_mb']:8.1f} MB  mlx-lm {r['mlx_lm_mb']:8.1f} MB  "
              f"(mlx-lm / ours {r['ratio']:.2f})")
        results.append(r)
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
