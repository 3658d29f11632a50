"""`deltaserve convert` and `deltaserve validate` (also `python -m convert convert|validate ...`)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from .errors import ConvertError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 512 * 2**20, '1000' -> 1000."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 512MiB)")
    unit = (m[2] or "").lower().removesuffix("b")
    return int(float(m[1]) * _UNITS[unit])


def _alpha(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'auto': {text!r}") from None


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a GGUF or HF checkpoint into an MLX checkpoint directory",
                              description="Convert a Qwen3.5 GGUF (one file, or the first part of a split one) "
                                          "or HF checkpoint directory into MLX safetensors shards.")
    p.add_argument("--input", required=True, help="FILE.gguf (first part if split) or a checkpoint directory")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of unquantised weights and of quantisation scales (default bfloat16)")
    p.add_argument("--quantize", "-q", action="store_true", help="quantise (MLX affine) per --q-recipe")
    p.add_argument("--q-bits", type=int, default=4, help="base bits d of the recipe (default 4)")
    p.add_argument("--q-group-size", type=int, default=64, help="quantisation group size (default 64)")
    p.add_argument("--q-recipe", default="unsloth", help="unsloth, uniform, or a recipe YAML file")
    p.add_argument("--imatrix-path", help="llama.cpp importance matrix (GGUF or legacy .dat)")
    p.add_argument("--awq", action=argparse.BooleanOptionalAction, default=None,
                   help="imatrix-guided AWQ pre-scaling (default: on with --imatrix-path)")
    p.add_argument("--awq-alpha", default="auto", type=_alpha,
                   help="AWQ exponent: s = importance^alpha, a number in [0, 1] or 'auto' (default): chosen "
                        "per group by the imatrix-weighted quantisation error")
    p.add_argument("--weighted-scales", action=argparse.BooleanOptionalAction, default=None,
                   help="importance-weighted scale search (default: on with --imatrix-path)")
    p.add_argument("--shard-size", type=parse_size, default=5 * 2**30, help="shard size (default 5GiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an output directory holding another model")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run_convert)

    v = subparsers.add_parser("validate", help="compare a converted directory with its reference",
                              description="Structural (per tensor class cosine) and functional (KL divergence, "
                                          "top-1 agreement) checks of a converted directory.")
    v.add_argument("output", help="the converted directory")
    v.add_argument("--reference", required=True, help="the source GGUF / checkpoint, or an unquantised MLX directory")
    v.add_argument("--threshold", type=float, default=0.995, help="minimum cosine per tensor (default 0.995)")
    v.add_argument("--text", help="text file for the functional check (KLD, top-1)")
    v.add_argument("--max-tokens", type=int, default=512, help="tokens of --text to use (default 512)")
    v.add_argument("--context", type=int, default=256, help="tokens per forward window (default 256)")
    v.add_argument("--no-structural", dest="structural", action="store_false", help="skip the tensor check")
    v.set_defaults(func=run_validate)


def _fail(command: str, e: Exception) -> int:
    print(f"deltaserve {command}: error: {e}", file=sys.stderr)
    return 1


def run_convert(args) -> int:
    from .pipeline import convert

    try:
        out = convert(args.input, args.output, dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits,
                      q_group_size=args.q_group_size, q_recipe=args.q_recipe, imatrix_path=args.imatrix_path,
                      awq=args.awq, awq_alpha=args.awq_alpha, weighted_scales=args.weighted_scales,
                      shard_size_bytes=args.shard_size, overwrite=args.overwrite,
                      progress=False if args.quiet else None)
    except ConvertError as e:
        return _fail("convert", e)
    except KeyboardInterrupt:
        print("\ndeltaserve convert: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    if args.quiet:
        return 0
    report = Path(out) / "convert_report.md"
    print(f"deltaserve convert: wrote {out}")
    if report.exists():
        print(report.read_text(), end="")
    return 0


def run_validate(args) -> int:
    from .validate import functional, render_structural, structural

    try:
        failed = False
        if args.structural:
            results = structural(args.output, args.reference, args.threshold)
            print(render_structural(results, args.threshold))
            failed = any(r.min_cos < args.threshold for r in results)
            print(f"structural: {'FAIL' if failed else 'ok'} (threshold {args.threshold})")
        if args.text:
            try:
                text = Path(args.text).read_text(encoding="utf-8")
            except OSError as e:
                raise ConvertError(f"{args.text}: cannot read ({e.strerror})") from None
            f = functional(args.output, args.reference, text, args.max_tokens, args.context)
            print(f"functional: {f.positions} positions, mean KLD {f.mean_kld:.6f}, top-1 agreement {f.top1:.4f}")
    except ConvertError as e:
        return _fail("validate", e)
    return 1 if failed else 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m convert", description="deltaserve checkpoint conversion")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
