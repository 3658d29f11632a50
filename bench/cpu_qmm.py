"""Where dequantise-then-BLAS beats MLX's quantised matmul (model/quantized.py's DEQUANT_MIN_ROWS):
times both for a range of row counts against one quantised weight, and the sorted-expert path against
gather_qmm. Meaningful on the CPU backend only.

    python -m bench.cpu_qmm [--shape 8192x2048] [--bits 4]
"""

from __future__ import annotations

import argparse
import time

import model  # noqa: F401  (OpenBLAS before mlx.core)
import mlx.core as mx
import numpy as np

from bench.common import backend
from model import quantized


def best(f, repeats=3):
    mx.eval(f())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="8192x2048", help="out x in of the dense weight")
    ap.add_argument("--rows", default="1,4,8,12,16,32,128,512")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--experts", default="256x512x2048", help="experts x out x in (top-8 routing)")
    ap.add_argument("--tokens", default="128,512,2048", help="tokens routed to the experts")
    args = ap.parse_args(argv)
    q = dict(group_size=64, bits=args.bits)
    print(f"backend {backend()}, {args.bits}-bit, group 64")

    out_dims, in_dims = map(int, args.shape.split("x"))
    w, s, b = mx.quantize(mx.random.normal((out_dims, in_dims)) * 0.02, **q)
    for rows in map(int, args.rows.split(",")):
        x = mx.random.normal((rows, in_dims))
        kernel = best(lambda: mx.quantized_matmul(x, w, s, b, transpose=True, **q))
        mx.eval(x)
        deq = best(lambda: x @ quantized.dequantize(w, s, b, 64, args.bits).T)
        print(f"dense {out_dims}x{in_dims}, {rows:5d} rows: quantized_matmul {kernel * 1e3:8.1f} ms, "
              f"dequantise + matmul {deq * 1e3:8.1f} ms ({kernel / deq:.2f}x)", flush=True)

    E, out_dims, in_dims = map(int, args.experts.split("x"))
    w, s, b = mx.quantize(mx.random.normal((E, out_dims, in_dims)) * 0.02, **q)
    mx.eval(w, s, b)
    rng = np.random.default_rng(0)
    for tokens in map(int, args.tokens.split(",")):
        idx = mx.array(np.sort(np.concatenate([rng.permutation(E)[:8] for _ in range(tokens)])).astype(np.uint32))
        x = mx.random.normal((idx.size, 1, in_dims))
        mx.eval(x)
        kernel = best(lambda: mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, sorted_indices=True, **q), 1)
        ours = best(lambda: quantized.sorted_expert_matmul(x, w, s, b, idx, 64, args.bits), 1)
        print(f"experts {E}x{out_dims}x{in_dims}, {tokens:5d} tokens top-8: gather_qmm {kernel * 1e3:8.1f} ms, "
              f"sorted_expert_matmul {ours * 1e3:8.1f} ms ({kernel / ours:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
