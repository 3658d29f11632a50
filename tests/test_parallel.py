"""model.parallel on 2 local ranks (ring backend) against one rank, in both modes: fp32
logits within 1e-4 (relative to the logit range) of transformers' and 24 greedy tokens equal to
transformers', identical logits on every rank; a 4-bit checkpoint written by mlx-lm against our model
on one rank; each rank holding only its share of the layers; clear refusals of impossible splits.
The tensor split runs every fixture shape (each splits its heads differently); a pipeline stage runs
its layers unchanged, so the pipeline runs an untied MoE (also split unevenly) and a tied dense
model, which between them take every path of its own: the embedding on rank 0 only or on every
rank, the stage boundaries, last_only and ragged batches.
Both modes' cases run in one launch of 2 ranks (tests/data/parallel_worker.py)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures import FIXTURES, get_fixture
from fixtures.ports import free_port
from mlx.utils import tree_flatten

from model import load_model
from model.config import ModelConfig
from model.parallel import load_distributed, split_layers, tensor_split_problems

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "data" / "parallel_worker.py"
LAUNCH_TIMEOUT = 300  # a hung collective fails the test instead of hanging it
GREEDY_TOKENS = 24
MODES = ("pipeline", "tensor")
SHAPES = {"pipeline": ["moe_r4", "dense_r2_tied"], "tensor": FIXTURES}
# also run the runner's out-of-order evaluation (the tensor split's closing all_sum differs in MoE)
BATCH_CASES = {"pipeline": ("dense_r2_tied",), "tensor": ("moe_r3_fa2", "dense_r2_tied")}


def launch(n: int, cases: list[dict], out: Path) -> list[dict]:
    """Run the worker on n local ranks; each rank's {name: result}. Each rank is started with the
    environment mlx.launch would give it: mlx.launch's own loop polls its ranks' pipes without
    blocking, half a core for as long as they run."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "cases": cases}))
    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(n)]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "MLX_HOSTFILE": str(hostfile),
           "OPENBLAS_NUM_THREADS": "1"}  # the ranks share this machine's cores: BLAS threads would wait on each other
    logs = [out / f"rank{r}.log" for r in range(n)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(spec)], cwd=REPO, env={**env, "MLX_RANK": str(r)},
                              stdout=logs[r].open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
             for r in range(n)]

    def log() -> str:
        return "\n".join(f"--- rank {r}\n{path.read_text(errors='replace')[-3000:]}" for r, path in enumerate(logs))

    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        # a rank that fails leaves the others blocked in a collective: stop at the first failure
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() for p in procs):
                pytest.fail(f"a rank failed:\n{log()}")
            time.sleep(0.2)
        if any(p.poll() is None for p in procs):
            pytest.fail(f"{n} ranks did not finish within {LAUNCH_TIMEOUT} s:\n{log()}")
        assert not any(p.returncode for p in procs), log()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    ranks = []
    for r in range(n):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no results:\n{log()}"
        ranks.append({res["name"]: res for res in json.loads(path.read_text())["results"]})
    return ranks


def fixture_case(name: str, mode: str) -> dict:
    fx = get_fixture(name)
    return dict(name=f"{mode}/{name}", path=str(fx.hf_dir), mode=mode, prompt=fx.prompt_ids.tolist(),
                greedy=GREEDY_TOKENS, ref_logits=str(fx.hf_dir.parent / "ref_logits.npy"),
                batch=name in BATCH_CASES.get(mode, ()))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """dense_r2_tied quantised to 4 bits by mlx-lm, with groups of 32 (splits over 2 ranks in both
    modes) and of 64 (o_proj's 64 input columns are one group: no tensor split)."""
    from mlx_lm import convert as mlx_convert

    fx = get_fixture("dense_r2_tied")
    root = tmp_path_factory.mktemp("quantized")
    src = root / "src"
    shutil.copytree(fx.hf_dir, src)
    (src / "config.json").write_text(json.dumps({**fx.config, "model_type": "qwen3_5"}))
    out = {}
    for group in (32, 64):
        out[group] = root / f"q4g{group}"
        mlx_convert(str(src), mlx_path=str(out[group]), quantize=True, q_bits=4, q_group_size=group)
    return fx, out


@pytest.fixture(scope="module")
def runs(quantized, tmp_path_factory):
    """{mode: each rank's {name: result}}, from one launch of 2 ranks."""
    fx, q = quantized
    cases = []
    for mode in MODES:
        cases += [fixture_case(name, mode) for name in SHAPES[mode]]
        common = dict(mode=mode, prompt=fx.prompt_ids.tolist(), greedy=GREEDY_TOKENS, plain=True)
        cases.append(dict(name=f"{mode}/q4g32", path=str(q[32]), **common))
    # a rank with 3x the memory of the other takes 3/4 of the layers
    cases.append({**fixture_case("moe_r4", "pipeline"), "name": "pipeline/moe_r4_uneven", "memory": [3, 1],
                  "ref_logits": None})
    cases.append(dict(name="tensor/q4g64", path=str(q[64]), mode="tensor", prompt=fx.prompt_ids.tolist(),
                      greedy=GREEDY_TOKENS, plain=True))
    ranks = launch(2, cases, tmp_path_factory.mktemp("ranks"))
    return {mode: [{k.split("/", 1)[1]: v for k, v in r.items() if k.startswith(f"{mode}/")} for r in ranks]
            for mode in MODES}


def ok(ranks, name):
    results = [r[name] for r in ranks]
    for rank, res in enumerate(results):
        assert "error" not in res, f"rank {rank}: {res['error']}"
    return results


@pytest.mark.parametrize("mode, name", [(mode, name) for mode in MODES for name in SHAPES[mode]])
def test_logits_and_greedy_tokens_match_one_rank(runs, mode, name):
    ranks = runs[mode]
    fx = get_fixture(name)
    results = ok(ranks, name)
    # every rank computes the same logits, bit for bit, so all sample the same tokens; rank 0's
    # are compared with transformers'
    for key in ("logits_digest", "greedy_digest", "batch_digest", "tokens"):
        assert len({str(res.get(key)) for res in results}) == 1, key
    res = results[0]
    assert res["rel_err"] <= 1e-4, (mode, res["rel_err"])
    assert res["tokens"] == [int(t) for t in fx.greedy_ids[:GREEDY_TOKENS]]
    if name in BATCH_CASES[mode]:
        assert res["batch_rel_err"] <= 1e-4, (mode, res["batch_rel_err"])
        assert all(r["token_from_rank0"] == res["tokens"][0] for r in results)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_checkpoint(runs, mode):
    ranks = runs[mode]
    results = ok(ranks, "q4g32")
    for key in ("logits_digest", "greedy_digest", "tokens"):
        assert len({str(res[key]) for res in results}) == 1, key
    assert results[0]["rel_err"] <= 1e-4, (mode, results[0]["rel_err"])
    assert results[0]["tokens"] == results[0]["plain_tokens"]


@pytest.mark.parametrize("mode", MODES)
def test_each_rank_holds_its_share(runs, mode):
    """Pipeline: the ranks' layers partition the model's (rank 0 the first half); tensor: every
    rank has every layer with half its weights (norms and routers replicated). Memory after loading
    is what the rank's parameters hold: nothing else was read and kept."""
    ranks = runs[mode]
    fx = get_fixture("moe_r4")
    n_layers = fx.config["num_hidden_layers"]
    results = ok(ranks, "moe_r4")
    plain = sum(v.nbytes for k, v in tree_flatten(load_model(fx.hf_dir, dtype="float32").parameters()) if ".layers." in k)
    for res in results:
        assert res["active_bytes"] <= 1.02 * res["param_bytes"] + (1 << 20)
    if mode == "pipeline":
        assert [res["cache_layers"] for res in results] == [n_layers // 2, n_layers // 2]
        assert sum(res["layer_param_bytes"] for res in results) == plain
        uneven = ok(ranks, "moe_r4_uneven")
        assert [res["cache_layers"] for res in uneven] == [3 * n_layers // 4, n_layers // 4]
        assert uneven[0]["tokens"] == results[0]["tokens"]
        assert uneven[0]["logits_digest"] == results[0]["logits_digest"]
    else:
        assert [res["cache_layers"] for res in results] == [n_layers, n_layers]
        for res in results:
            assert 0.5 * plain <= res["layer_param_bytes"] <= 0.52 * plain


def test_tensor_split_refuses_partial_quantization_groups(runs):
    for r in runs["tensor"]:
        error = r["q4g64"].get("error", "")
        # o_proj's and out_proj's 64 input columns are one group of 64
        assert re.fullmatch(r"tensor parallel over 2 ranks is impossible: language_model\.model\.layers\.\d+\."
                            r"(self_attn\.o_proj|linear_attn\.out_proj) has 1 quantization groups along its input, "
                            r"which do not split into 2 whole parts .*", error), error


def test_three_ranks_refuse_tensor_split_naming_the_sizes(tmp_path):
    fx = get_fixture("moe_r4")
    ranks = launch(3, [fixture_case("moe_r4", "tensor")], tmp_path)
    for r in ranks:
        assert r["tensor/moe_r4"].get("error") == (
            "tensor parallel over 3 ranks is impossible: num_key_value_heads (2) is not divisible by 3; "
            "linear_num_key_heads (2) is not divisible by 3; moe_intermediate_size (32) is not divisible by 3; "
            f"shared_expert_intermediate_size ({fx.config['shared_expert_intermediate_size']}) is not divisible by 3")


def test_split_problems_are_named():
    config = ModelConfig.from_dict(get_fixture("dense_r2_tied").config)
    assert tensor_split_problems(config, 2) == []
    assert tensor_split_problems(config, 4) == ["num_key_value_heads (2) is not divisible by 4",
                                                "linear_num_key_heads (2) is not divisible by 4"]
    assert split_layers(8, [1, 1]) == [0, 4, 8]
    assert split_layers(4, [1, 100]) == [0, 1, 4]  # every rank gets a layer
    assert split_layers(60, [512, 256, 256]) == [0, 30, 45, 60]
    with pytest.raises(ValueError, match="pipeline over 5 ranks needs at least 5 layers; the model has 4"):
        split_layers(4, [1] * 5)


def test_bad_arguments_are_refused():
    import mlx.core as mx

    path, group = get_fixture("moe_r4").hf_dir, mx.distributed.init()
    with pytest.raises(ValueError, match="distributed mode must be one of pipeline, tensor, got 'data'"):
        load_distributed(path, "data", group)
    with pytest.raises(ValueError, match="memory gives 2 ranks' sizes; the group has 1 ranks"):
        load_distributed(path, "pipeline", group, memory=[1, 1])
