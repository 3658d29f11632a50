"""Speculative decoding with the model's MTP head, in one run on one checkpoint: decode tokens/s at
each batch size for plain decoding (K = 0, decode-ahead as the engine does it), each fixed draft
depth K and the adaptive depth (K = max allowed), the acceptance at each draft position, and
mlx-lm alongside (generate_step at batch 1, BatchGenerator above); greedy, the same prompts and
token counts for all, runs alternating between engines so that drift in the machine's speed hits
all alike. Then where a speculative step's time goes (draft, verify, the rest) at each K and batch.

    python -m bench.speculative --model demo --out bench/results.jsonl
    python -m bench.speculative --model mtp_moe   # 152k vocabulary, random head: the cost side

Models: `demo` (the embedded demo model with its trained head, bench.models), `mtp_dense` or
`mtp_moe` (an MTP test fixture, Qwen's 152k vocabulary, converted by our converter unquantised;
its random head accepts next to nothing, so it measures what drafting costs), or a path. mlx-lm
loads the same files and drops `mtp.*`.

Decode tokens/s counts the tokens emitted after every row has its first one, over the time since:
prefill is left out. The table shows each engine's best run (the JSON rows also the median). Each
engine is built once and kept across repeats (the adaptive depth keeps what it learned, as a
server's engine would); a warm-up pass runs every configuration first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import mlx.core as mx
import numpy as np

from bench import models
from bench.common import backend, finish, load_both
from server.engine import EngineConfig, EngineCore, SamplingParams

GOAL_B1 = 1.5  # batch 1: x our K = 0 and x mlx-lm
GOAL_LARGE = 0.95  # the largest batch: never below this x K = 0 (adaptive)


def checkpoint(name: str) -> Path:
    if name == "demo":
        return models.get("demo")
    from fixtures.mtp import MTP_FIXTURES

    if name in MTP_FIXTURES:
        from convert import convert
        from fixtures.mtp import get_mtp_fixture

        fx = get_mtp_fixture(name)
        # keyed by the fixture's directory, whose name changes with its build inputs
        return convert(fx.hf_dir, models.CACHE / fx.hf_dir.parent.name, dtype="bfloat16", progress=False)
    path = Path(name)
    if not (path / "config.json").exists():
        raise SystemExit(f"--model {name}: not demo, one of {', '.join(MTP_FIXTURES)} or a checkpoint directory")
    return path


def prompt_pool(name: str, path: Path, n: int, length: int, vocab: int) -> list[list[int]]:
    """n prompts of up to `length` tokens. The demo model: held-out conversations of its corpus up to
    their last assistant turn (text the head was trained for), the first n that fit; other models:
    random tokens."""
    if name != "demo":
        rng = np.random.default_rng(0)
        return [rng.integers(0, vocab, length).tolist() for _ in range(n)]
    from tokenizers import Tokenizer

    from demo import corpus
    from demo.train_mtp import last_turn_prompt

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    template = (path / "chat_template.jinja").read_text()
    pool = []
    for s in corpus.generate("heldout", 40 * n, reasoning="lookup"):
        ids = tok.encode(corpus.render(last_turn_prompt(s), s.tools, template, add_generation_prompt=True),
                         add_special_tokens=False).ids
        if len(ids) <= length:
            pool.append(ids)
            if len(pool) == n:
                return pool
    raise SystemExit(f"fewer than {n} held-out conversations fit in --prompt {length} tokens")


# ---- one run of each engine: decode tokens/s once every row has its first token ----

def ours(core: EngineCore, prompts, tokens: int) -> dict:
    seen, count = set(), [0]

    def emit(d):
        seen.add(d.request_id)
        count[0] += len(d.token_ids)

    core.emit = emit
    drafted, accepted = list(core.drafted), list(core.accepted)
    for p in prompts:
        core.add(p, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
    start = None
    while core.has_work():
        core.step()
        if start is None and len(seen) == len(prompts):
            start, base, steps = time.perf_counter(), count[0], core.steps
    elapsed = time.perf_counter() - start
    assert count[0] == tokens * len(prompts), count[0]
    return {"tok_s": (count[0] - base) / elapsed, "steps": core.steps - steps, "tokens": count[0] - base,
            "drafted": [a - b for a, b in zip(core.drafted, drafted)],
            "accepted": [a - b for a, b in zip(core.accepted, accepted)]}


def mlx_lm(model, prompts, tokens: int) -> dict:
    from mlx_lm.generate import BatchGenerator, generate_step

    if len(prompts) == 1:
        times = [time.perf_counter() for _ in generate_step(mx.array(prompts[0]), model, max_tokens=tokens,
                                                            sampler=lambda x: mx.argmax(x, axis=-1))]
        return {"tok_s": (len(times) - 1) / (times[-1] - times[0])}
    gen = BatchGenerator(model, max_tokens=tokens, completion_batch_size=len(prompts),
                         prefill_batch_size=len(prompts), stop_tokens=[])
    gen.insert(prompts, [tokens] * len(prompts))
    seen, produced, done, start = set(), 0, 0, None
    while done < len(prompts):
        _, responses = gen.next()
        for r in responses:
            seen.add(r.uid)
            produced += 1
            done += r.finish_reason is not None
        if start is None and len(seen) == len(prompts):
            start, base = time.perf_counter(), produced
    elapsed = time.perf_counter() - start
    gen.close()
    return {"tok_s": (produced - base) / elapsed}


def config(k: int, adapt: bool = False, decode_ahead: bool = True) -> EngineConfig:
    return EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=16 << 30, max_num_seqs=64, decode_ahead=decode_ahead,
                        prefill_tokens_per_step=1 << 16, num_speculative_tokens=k, speculative_adapt=adapt)


def depth_counter(core: EngineCore) -> Counter:
    """Counts the depths the core's controller picks (the adaptive run's table column)."""
    chosen, choose = Counter(), core.depth.choose

    def counted(rows):
        k = choose(rows)
        chosen[k] += 1
        return k

    core.depth.choose = counted
    return chosen


# ---- where a step's time goes ----

def profile(model, prompts, tokens: int, k: int) -> dict:
    """ms per decode step in the draft, in the verify forward (or, at K = 0, the plain forward) and
    in all the rest, each forced to finish before the next starts (so no overlap between them, unlike
    the throughput runs)."""
    core = EngineCore(model, None, config(k, decode_ahead=False))  # K = 0: one forward per step, timed alone
    spent = {"draft": 0.0, "forward": 0.0}

    def timed(fn, key):
        def run(*args):
            t = time.perf_counter()
            out = fn(*args)
            mx.eval([a for a in (out if isinstance(out, tuple) else (out,)) if isinstance(a, mx.array)])
            spent[key] += time.perf_counter() - t
            return out
        return run

    ours(core, prompts, 4)  # warm up
    if k:
        core.runner.draft = timed(core.runner.draft, "draft")
        core.runner.verify = timed(core.runner.verify, "forward")
    else:
        core.runner.decode = timed(core.runner.decode, "forward")
    seen, steps, total = set(), 0, 0.0
    core.emit = lambda d: seen.add(d.request_id)
    for p in prompts:
        core.add(p, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
    while core.has_work():
        ready = len(seen) == len(prompts)
        if ready and not steps:
            spent.update(dict.fromkeys(spent, 0.0))  # prefill's own work is not a decode step's
        t = time.perf_counter()
        core.step()
        if ready:
            steps, total = steps + 1, total + time.perf_counter() - t
    ms = {key: 1000 * v / steps for key, v in spent.items()}
    return {**ms, "step": 1000 * total / steps, "rest": 1000 * total / steps - sum(ms.values())}


def forward_costs(model, shapes=((1, 1), (1, 2), (1, 4), (2, 1), (4, 1), (16, 1), (16, 2), (16, 4)),
                  context: int = 100, reps: int = 20) -> list[dict]:
    """The trunk's forward alone, ms (fastest of reps) per (rows, positions per row) after `context`
    tokens, keeping per-position states as verification does when positions > 1: what an extra draft
    position costs against an extra row."""
    out = []
    for rows, positions in shapes:
        cache = model.make_cache(rows)
        model(mx.zeros((rows, context), dtype=mx.uint32), cache)
        mx.eval(cache.state())
        tokens, times = mx.ones((rows, positions), dtype=mx.uint32), []
        for _ in range(reps):  # the context grows by reps * positions: small beside `context`'s effect
            t = time.perf_counter()
            mx.eval(model(tokens, cache, lengths=[positions] * rows, keep_states=positions > 1))
            times.append(time.perf_counter() - t)
        out.append({"rows": rows, "positions": positions, "ms": 1000 * min(times)})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="demo | mtp_dense | mtp_moe | path to an MLX checkpoint")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--depths", default="1,2,3",
                    help="fixed draft depths besides 0; the adaptive run may use up to the largest")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per row")
    ap.add_argument("--prompt", type=int, default=256,
                    help="prompt tokens (demo: at most, each conversation's prompt as it is; others: random tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile-tokens", type=int, default=32,
                    help="tokens per row of the step-time breakdown (0: skip it)")
    ap.add_argument("--out", type=Path, default=None, help="append JSON results here")
    args = ap.parse_args(argv)
    try:
        batches = [int(x) for x in args.batches.split(",") if x]
        depths = sorted({int(x) for x in args.depths.split(",") if x})
    except ValueError:
        raise SystemExit("--batches and --depths are comma-separated integers")
    if not batches or min(batches) < 1 or not depths or min(depths) < 1 or args.tokens < 2 or args.repeats < 1:
        raise SystemExit("--batches and --depths need positive values, --tokens at least 2, --repeats at least 1")

    path = checkpoint(args.model)
    model, theirs = load_both(path)
    if not getattr(model, "mtp", None):
        raise SystemExit(f"{path}: no MTP head in this checkpoint (config.json's mtp_num_hidden_layers, mtp.* tensors)")
    pool = prompt_pool(args.model, path, max(batches) * args.repeats, args.prompt, model.config.vocab_size)
    names = ["mlx-lm", *(f"K={k}" for k in [0, *depths]), "adaptive"]
    cores = {f"K={k}": EngineCore(model, None, config(k)) for k in [0, *depths]}
    cores["adaptive"] = EngineCore(model, None, config(max(depths), adapt=True))
    chosen = depth_counter(cores["adaptive"])

    def run(name, prompts, tokens):
        return mlx_lm(theirs, prompts, tokens) if name == "mlx-lm" else ours(cores[name], prompts, tokens)

    for b in batches:  # warm-up: every engine at every batch size
        for name in names:
            run(name, pool[:b], min(16, args.tokens))
    runs = {(b, name): [] for b in batches for name in names}
    depths_at = {}
    for r in range(args.repeats):
        for b in batches:
            prompts = [pool[(r * b + i) % len(pool)] for i in range(b)]  # each repeat its own conversations
            chosen.clear()
            for name in names:
                runs[b, name].append(run(name, prompts, args.tokens))
            depths_at.setdefault(b, Counter()).update(chosen)
            print(f"repeat {r + 1}/{args.repeats}, batch {b}: done", file=sys.stderr, flush=True)

    results = []
    for b in batches:
        # the best run of each: on a shared machine other work only ever slows a run down
        best = {name: max(x["tok_s"] for x in runs[b, name]) for name in names}
        med = {name: statistics.median(x["tok_s"] for x in runs[b, name]) for name in names}
        for name in names[1:]:
            rs = runs[b, name]
            drafted = np.sum([x["drafted"] for x in rs], axis=0) if rs[0]["drafted"] else np.zeros(0)
            accepted = np.sum([x["accepted"] for x in rs], axis=0) if rs[0]["accepted"] else np.zeros(0)
            row = {"bench": f"spec_b{b}_{name.replace('K=', 'k')}", "suite": "speculative", "batch": b, "engine": name,
                   "ours_tok_s": best[name], "ours_median_tok_s": med[name],
                   "mlx_lm_tok_s": best["mlx-lm"], "mlx_lm_median_tok_s": med["mlx-lm"],
                   "ratio": best[name] / best["mlx-lm"], "ratio_k0": best[name] / best["K=0"],
                   "tokens_per_step": sum(x["tokens"] for x in rs) / sum(x["steps"] for x in rs) / b,
                   "acceptance": [round(float(a / d), 3) if d else None for a, d in zip(accepted, drafted)],
                   "drafted": drafted.tolist()}
            if name == "adaptive":
                total = max(sum(depths_at[b].values()), 1)
                row["depth_share"] = {k: round(n / total, 3) for k, n in sorted(depths_at[b].items())}
            results.append(row)

    costs, forwards = [], []
    if args.profile_tokens:
        for b in batches:
            for k in [0, *depths]:
                costs.append({"batch": b, "k": k, **profile(model, pool[:b], args.profile_tokens, k)})
        forwards = forward_costs(model)

    meta = {"model": args.model, "backend": backend(), "dtype": str(model.compute_dtype), "tokens": args.tokens,
            "repeats": args.repeats, "date": time.strftime("%Y-%m-%d")}
    print(table(results, costs, forwards, batches, meta))
    for c in costs:
        c.update(bench=f"spec_cost_b{c['batch']}_k{c['k']}", suite="speculative", **meta)
    for f in forwards:
        f.update(bench=f"spec_forward_{f['rows']}x{f['positions']}", suite="speculative", **meta)
    results = finish(results, meta, args.out)
    if args.out:
        with open(args.out, "a") as out:
            out.writelines(json.dumps(c) + "\n" for c in costs + forwards)
    return results


def table(results: list[dict], costs: list[dict], forwards: list[dict], batches: list[int], meta: dict) -> str:
    lines = [f"Model `{meta['model']}`, {meta['backend']}, {meta['dtype']}, {meta['tokens']} greedy tokens per row, "
             f"best of {meta['repeats']} runs:", "",
             "| batch | engine | tok/s | × K=0 | × mlx-lm | tokens per row-step | acceptance per draft position |",
             "|---|---|---|---|---|---|---|"]
    for b in batches:
        rows = [r for r in results if r["batch"] == b]
        lines.append(f"| {b} | mlx-lm | {rows[0]['mlx_lm_tok_s']:.0f} | | | | |")
        for r in rows:
            acc = ", ".join("–" if a is None else f"{a:.2f}" for a in r["acceptance"])
            acc = f"{acc} ({r['drafted'][0]} first drafts)" if acc else "–"
            engine = r["engine"] if "depth_share" not in r else "adaptive (depth " + ", ".join(
                f"{k}: {share:.0%}" for k, share in r["depth_share"].items()) + ")"
            lines.append(f"| {b} | {engine} | {r['ours_tok_s']:.0f} | {r['ratio_k0']:.2f}× | {r['ratio']:.2f}× "
                         f"| {r['tokens_per_step']:.2f} | {acc} |")
    adaptive = {r["batch"]: r for r in results if r["engine"] == "adaptive"}
    best = {b: max((r for r in results if r["batch"] == b and r["engine"].startswith("K=") and r["engine"] != "K=0"),
                   key=lambda r: r["ours_tok_s"]) for b in batches}
    lines += ["", "Goals:"]
    b1, top = min(batches), max(batches)
    for label, r in (("adaptive", adaptive[b1]), (f"best fixed depth ({best[b1]['engine']})", best[b1])):
        ok = r["ratio_k0"] >= GOAL_B1 and r["ratio"] >= GOAL_B1
        lines.append(f"- batch {b1}, {label}: {r['ratio_k0']:.2f}× K=0, {r['ratio']:.2f}× mlx-lm "
                     f"(goal ≥ {GOAL_B1}× both): {'met' if ok else 'not met'}")
    r = adaptive[top]
    lines.append(f"- batch {top}, adaptive: {r['ratio_k0']:.2f}× K=0 (goal ≥ {GOAL_LARGE}×): "
                 f"{'met' if r['ratio_k0'] >= GOAL_LARGE else 'not met'}")
    if costs:
        lines += ["", "Where a decode step's time goes (ms per step, each part finished before the next starts):", "",
                  "| batch | K | draft | forward (K=0: plain, else verify over K+1 positions) | the rest | step |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['batch']} | {c['k']} | {c['draft']:.1f} | {c['forward']:.1f} | {c['rest']:.1f} "
                  f"| {c['step']:.1f} |" for c in costs]
    if forwards:
        lines += ["", "The trunk's forward alone (ms), by rows × positions per row:", "",
                  "| " + " | ".join(f"{f['rows']}×{f['positions']}" for f in forwards) + " |",
                  "|" + "---|" * len(forwards), "| " + " | ".join(f"{f['ms']:.1f}" for f in forwards) + " |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
