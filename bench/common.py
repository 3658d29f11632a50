"""What every benchmark shares: the checkpoint both engines load, the backend's name, and how a
result row is printed and saved."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import mlx.core as mx

from bench import models


def backend() -> str:
    if mx.metal.is_available():
        name = "metal"
    elif getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        name = "cuda"
    else:
        name = "cpu"
    return f"{name} ({platform.machine()})"


def checkpoint(name: str) -> Path:
    return models.get(name) if name in ("demo", "tiny", "wide") else Path(name)


def load_both(path: Path):
    """deltaserve's model and mlx-lm's, from the same files, computing in the same dtype."""
    from mlx_lm.utils import load_model as mlx_lm_load

    from model import load_model

    ours = load_model(path)
    theirs, _ = mlx_lm_load(path)
    if ours.compute_dtype != mx.bfloat16:
        theirs.set_dtype(ours.compute_dtype)  # e.g. float32 on the CPU backend
    return ours, theirs


def describe(r: dict) -> tuple[str, str]:
    """(deltaserve, mlx-lm) values of a result row, with units."""
    if "ours_tok_s" in r:
        return f"{r['ours_tok_s']:.1f} tok/s", f"{r['mlx_lm_tok_s']:.1f} tok/s"
    if "ours_s" in r:
        return f"{r['ours_s'] * 1000:.0f} ms", f"{r['mlx_lm_s'] * 1000:.0f} ms"
    return f"{r['ours_mb']:.1f} MB", f"{r['mlx_lm_mb']:.1f} MB"


def finish(results: list[dict], meta: dict, out: Path | None) -> list[dict]:
    for r in results:
        r.update(meta)
        ours, theirs = describe(r)
        print(f"{r['bench']:>18}: deltaserve {ours:>14}   mlx-lm {theirs:>14}   ratio {r['ratio']:.2f}x")
    if out:
        with open(out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results
