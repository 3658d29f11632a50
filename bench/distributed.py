"""Tokens per second and memory per rank on 1 rank and on 2 local ranks (mlx.launch, ring backend), in
the same run: the engine steps in lockstep as `deltaserve serve --distributed` runs it
(server/distributed.py), without HTTP. Both ranks share this machine's cores and memory, so the
2-rank number measures what the lockstep protocol and the model's collectives cost, not a speed-up.

    python -m bench.distributed --model demo --modes pipeline,tensor --streams 1,4 --tokens 64

Each configuration runs in fresh processes: `--worker` is what each rank runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _ring_port() -> int:
    from fixtures.ports import free_port

    return free_port()


def _run_requests(core, lockstep, prompts: list[list[int]], max_tokens: int) -> float:
    """Rank 0: submit `prompts` at once, step (in lockstep) until all are done; tokens per second."""
    from server.engine import SamplingParams

    count = [0]
    core.emit = lambda d: count.__setitem__(0, count[0] + len(d.token_ids))
    start = time.perf_counter()
    items = [("add", core.new_request(p, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)))
             for p in prompts]
    while items or core.has_work():
        if lockstep is not None:
            lockstep.send(items, core)
        for _, req in items:
            core.enqueue(req)
        items = []
        core.step()
    return count[0] / (time.perf_counter() - start)


def worker(args) -> None:
    import mlx.core as mx

    from bench.common import checkpoint
    from model import load, load_tokenizer
    from server.engine import EngineConfig, EngineCore

    path = checkpoint(args.model)
    config = EngineConfig(max_num_seqs=max(args.streams), memory_budget_bytes=4 << 30, prefix_cache_bytes=0)
    if args.mode == "single":
        model, tokenizer = load(path)
        mx.eval(model.parameters())
        lockstep, core = None, EngineCore(model, tokenizer, config)
    else:
        from model.parallel import load_distributed
        from server.distributed import Lockstep

        lockstep = Lockstep(mx.distributed.init(), timeout_s=600)
        model = load_distributed(path, args.mode, lockstep.channel.group)
        mx.eval(model.parameters())
        tokenizer = load_tokenizer(path)
        core = lockstep.make_core(model, tokenizer, config)
    weights = mx.get_active_memory()
    allreduce_us = None
    if lockstep is not None:  # one small all_sum, evaluated alone: the latency a collective adds
        x = mx.array([1.0])
        start = time.perf_counter()
        for _ in range(200):
            mx.eval(lockstep.channel.sum(x))
        allreduce_us = (time.perf_counter() - start) / 200 * 1e6
    if lockstep is not None and lockstep.rank != 0:
        lockstep.follow(core)
        lockstep.channel.gather([weights, mx.get_peak_memory()])
        return
    ids = list(tokenizer.encode("The history of the city begins"))
    prompts = [ids[: 4 + i % 3] for i in range(max(args.streams))]
    _run_requests(core, lockstep, prompts[:2], 8)  # kernels are compiled on first use
    rates = {n: _run_requests(core, lockstep, prompts[:n], args.tokens) for n in args.streams}
    if lockstep is not None:
        lockstep.close()
        memory = lockstep.channel.gather([weights, mx.get_peak_memory()])
    else:
        memory = [[weights, mx.get_peak_memory()]]
    print("RESULT " + json.dumps({"mode": args.mode, "ranks": len(memory), "tok_s": rates, "allreduce_us": allreduce_us,
                                  "weights_mb": [m[0] / 2**20 for m in memory],
                                  "peak_mb": [m[1] / 2**20 for m in memory]}), flush=True)


def run(args, mode: str) -> dict:
    me = [sys.executable, "-m", "bench.distributed", "--worker", "--mode", mode, "--model", args.model,
          "--streams", ",".join(map(str, args.streams)), "--tokens", str(args.tokens)]
    if mode != "single":
        me = [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "-p", str(_ring_port()), "--", *me]
    proc = subprocess.Popen(me, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only the launcher
        stdout, stderr = proc.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{mode} failed (exit {proc.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="demo", help="demo, tiny, wide or a checkpoint directory")
    p.add_argument("--modes", default="pipeline,tensor")
    p.add_argument("--streams", default="1,4", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--tokens", type=int, default=64, help="generated per stream")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    from bench.common import backend

    results = [run(args, mode) for mode in ["single", *args.modes.split(",")]]
    base = results[0]["tok_s"]
    print(f"\n{args.model} on {backend()}, {args.tokens} tokens per stream, greedy")
    print(f"{'split':>9} {'ranks':>5} " + " ".join(f"{f'{n} stream tok/s':>16} {'vs 1 rank':>9}" for n in args.streams)
          + f" {'weights MB per rank':>22} {'peak MB per rank':>20} {'all_sum µs':>10}")
    for r in results:
        cells = " ".join(f"{r['tok_s'][str(n)]:>16.1f} {r['tok_s'][str(n)] / base[str(n)]:>8.2f}x"
                         for n in args.streams)
        weights = "/".join(f"{m:.1f}" for m in r["weights_mb"])
        peak = "/".join(f"{m:.1f}" for m in r["peak_mb"])
        us = "" if r["allreduce_us"] is None else f"{r['allreduce_us']:.0f}"
        print(f"{r['mode']:>9} {r['ranks']:>5} {cells} {weights:>22} {peak:>20} {us:>10}")


if __name__ == "__main__":
    main()
