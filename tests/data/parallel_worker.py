"""Run by tests/test_parallel.py on N ring ranks (MLX_RANK, MLX_HOSTFILE): every rank loads each case
of the spec (JSON, argv[1]) with model.parallel and writes what it computed to OUT/rank<r>.json.
The one-rank reference is transformers' logits for a fixture (its ref_logits.npy, passed by the
test), else our plain model (model.load_model) run in the same process."""

import hashlib
import json
import sys
import time
from pathlib import Path

import model  # noqa: F401  (first: OpenBLAS before mlx.core)
import mlx.core as mx  # noqa: I001
import numpy as np
from mlx.utils import tree_flatten

from model import load_model
from model.parallel import load_distributed


def relative_error(ours, ref):
    span = ref.max(axis=-1) - ref.min(axis=-1)
    return float((np.abs(ours - ref).max(axis=-1) / span).max())


def digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def layer_bytes(m) -> int:
    return sum(v.nbytes for k, v in tree_flatten(m.parameters()) if ".layers." in k)


def prompt_and_greedy(m, prompt, n):
    """The prompt's logits [T, vocab] and the n greedy tokens that continue that forward's cache."""
    cache = m.make_cache(1)
    logits = np.array(m(mx.array(prompt)[None], cache))[0]
    last, out = logits[-1], []
    start = time.perf_counter()
    for _ in range(n):
        token = int(np.array(last).argmax())
        out.append(token)
        last = m(mx.array([[token]]), cache)[0, -1]
    mx.eval(last)
    return logits, out, n / (time.perf_counter() - start), digest(np.array(last))


def ragged_out_of_order(m, prompt):
    """Two forwards (a ragged batch, then a single row), the second's cache state evaluated before
    either's logits, as the runner's prefill does: the exchanges must not deadlock."""
    p = np.asarray(prompt)
    tokens = np.zeros((2, len(p)), dtype=np.int32)
    tokens[0], tokens[1, : len(p) - 9] = p, p[9:]
    c1, c2 = m.make_cache(2), m.make_cache(1)
    a = m(mx.array(tokens), c1, lengths=[len(p), len(p) - 9], last_only=True)
    b = m(mx.array(p[:20])[None], c2, last_only=True)
    mx.eval(c2.state())
    mx.eval(c1.state())
    return np.concatenate([np.array(a)[:, 0], np.array(b)[:, 0]])


def token_from_rank0(m, prompt, group) -> int:
    """Rank 0 chooses from its logits, the others take its token through an all_sum that does not
    depend on their own logits, evaluated first (as the distributed server's sampler does): the
    forward's collectives must still run first on every rank."""
    logits = m(mx.array(prompt)[None], m.make_cache(1), last_only=True)[0, -1]
    mine = mx.argmax(logits).reshape(1).astype(mx.int32) if group.rank() == 0 else mx.zeros((1,), mx.int32)
    token = mx.distributed.all_sum(mine, group=group)
    mx.eval(token)
    mx.eval(logits)
    return int(token.item())


def run_case(case, group):
    """This rank's result for the case, and on rank 0 what compares it with the one-rank reference,
    run once every rank is done (the others would wait for it in their next collective)."""
    kw = dict(dtype="float32")
    result = {"name": case["name"]}
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    try:
        m = load_distributed(case["path"], case["mode"], group, memory=case.get("memory"), **kw)
    except ValueError as e:
        result["error"] = str(e)
        return result, None
    result["active_bytes"] = mx.get_active_memory() - base
    result["peak_bytes"] = mx.get_peak_memory() - base
    result["param_bytes"] = sum(v.nbytes for _, v in tree_flatten(m.parameters()))
    result["layer_param_bytes"] = layer_bytes(m)
    result["cache_layers"] = len(m.make_cache(1).layers)
    prompt = [int(t) for t in case["prompt"]]
    logits, result["tokens"], result["tokens_per_s"], result["greedy_digest"] = prompt_and_greedy(
        m, prompt, case["greedy"])
    result["logits_digest"] = digest(logits)
    if case.get("batch"):
        batch = ragged_out_of_order(m, prompt)
        result["batch_digest"] = digest(batch)
        result["token_from_rank0"] = token_from_rank0(m, prompt, group)
    if group.rank() != 0:  # its digests equal rank 0's: comparing rank 0's outputs suffices
        return result, None

    def compare():
        if case.get("ref_logits"):  # transformers' logits: the independent one-rank reference
            result["rel_err"] = relative_error(logits, np.load(case["ref_logits"]))
        if case.get("batch") or case.get("plain"):
            plain = load_model(case["path"], **kw)
        if case.get("batch"):
            result["batch_rel_err"] = relative_error(batch, ragged_out_of_order(plain, prompt))
        if case.get("plain"):  # no transformers reference: our plain model on one rank
            plain_logits, result["plain_tokens"], result["plain_tokens_per_s"], _ = prompt_and_greedy(
                plain, prompt, case["greedy"])
            result["rel_err"] = relative_error(logits, plain_logits)

    return result, compare


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    group = mx.distributed.init(strict=True)
    results, comparisons = [], []
    for case in spec["cases"]:
        start = time.perf_counter()
        result, compare = run_case(case, group)
        results.append(result)
        comparisons += [compare] if compare else []
        print(f"rank {group.rank()}: {case['name']} {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    for compare in comparisons:
        compare()
    out = Path(spec["out"]) / f"rank{group.rank()}.json"
    out.write_text(json.dumps({"size": group.size(), "results": results}))


if __name__ == "__main__":
    main()
