"""model.parallel on 2 local ranks (mlx.launch, ring backend) against one rank, in both modes, on
every fixture shape: fp32 logits within 1e-4 (relative to the logit range) of transformers' and 24
greedy tokens equal to transformers', identical logits on every rank; a 4-bit checkpoint written by
mlx-lm against our model on one rank; each rank holding only its share of the layers; clear
refusals of impossible splits.
Each mode's ranks are launched once (tests/data/parallel_worker.py) and check every case."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
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
BATCH_CASES = ("moe_r3_fa2", "dense_r2_tied")  # also run the runner's out-of-order evaluation


def launch(n: int, cases: list[dict], out: Path) -> list[dict]:
    """Run the worker on n local ranks; each rank's {name: result}."""
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "cases": cases}))
    cmd = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(n), "--backend", "ring",
           "--starting-port", str(free_port()), "--", sys.executable, str(WORKER), str(spec)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OPENBLAS_NUM_THREADS": "1"}  # the ranks share this machine's cores: BLAS threads would wait on each other
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"{n} ranks did not finish within {LAUNCH_TIMEOUT} s:\n{log[-4000:]}")
    ranks = []
    for r in range(n):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no results:\n{log[-4000:]}"
        ranks.append({res["name"]: res for res in json.loads(path.read_text())["results"]})
    return ranks


def fixture_case(name: str, mode: str) -> dict:
    fx = get_fixture(name)
    return dict(name=name, path=str(fx.hf_dir), mode=mode, prompt=fx.prompt_ids.tolist(), greedy=GREEDY_TOKENS,
                ref_logits=str(fx.hf_dir.parent / "ref_logits.npy"), batch=name in BATCH_CASES)


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


@pytest.fixture(scope="module", params=["pipeline", "tensor"])
def run(request, quantized, tmp_path_factory):
    mode = request.param
    fx, q = quantized
    cases = [fixture_case(name, mode) for name in FIXTURES]
    common = dict(mode=mode, prompt=fx.prompt_ids.tolist(), greedy=GREEDY_TOKENS, plain=True)
    cases.append(dict(name="q4g32", path=str(q[32]), **common))
    if mode == "pipeline":  # a rank with 3x the memory of the other takes 3/4 of the layers
        cases.append({**fixture_case("moe_r4", mode), "name": "moe_r4_uneven", "memory": [3, 1], "ref_logits": None})
    else:
        cases.append(dict(name="q4g64", path=str(q[64]), **common))
    return mode, launch(2, cases, tmp_path_factory.mktemp(mode))


def ok(ranks, name):
    results = [r[name] for r in ranks]
    for rank, res in enumerate(results):
        assert "error" not in res, f"rank {rank}: {res['error']}"
    return results


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_and_greedy_tokens_match_one_rank(run, name):
    mode, ranks = run
    fx = get_fixture(name)
    results = ok(ranks, name)
    # every rank computes the same logits, bit for bit, so all sample the same tokens; rank 0's
    # are compared with transformers'
    for key in ("logits_digest", "greedy_digest", "batch_digest", "tokens"):
        assert len({str(res.get(key)) for res in results}) == 1, key
    res = results[0]
    assert res["rel_err"] <= 1e-4, (mode, res["rel_err"])
    assert res["tokens"] == [int(t) for t in fx.greedy_ids[:GREEDY_TOKENS]]
    if name in BATCH_CASES:
        assert res["batch_rel_err"] <= 1e-4, (mode, res["batch_rel_err"])
        assert all(r["token_from_rank0"] == res["tokens"][0] for r in results)


def test_quantized_checkpoint(run):
    mode, ranks = run
    results = ok(ranks, "q4g32")
    for key in ("logits_digest", "greedy_digest", "tokens"):
        assert len({str(res[key]) for res in results}) == 1, key
    assert results[0]["rel_err"] <= 1e-4, (mode, results[0]["rel_err"])
    assert results[0]["tokens"] == results[0]["plain_tokens"]


def test_each_rank_holds_its_share(run):
    """Pipeline: the ranks' layers partition the model's (rank 0 the first half); tensor: every
    rank has every layer with half its weights (norms and routers replicated). Memory after loading
    is what the rank's parameters hold: nothing else was read and kept."""
    mode, ranks = run
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


def test_tensor_split_refuses_partial_quantization_groups(run):
    mode, ranks = run
    if mode != "tensor":
        pytest.skip("the pipeline never splits a tensor")
    for r in ranks:
        error = r["q4g64"].get("error", "")
        # o_proj's and out_proj's 64 input columns are one group of 64
        assert re.fullmatch(r"tensor parallel over 2 ranks is impossible: language_model\.model\.layers\.\d+\."
                            r"(self_attn\.o_proj|linear_attn\.out_proj) has 1 quantization groups along its input, "
                            r"which do not split into 2 whole parts .*", error), error


def test_three_ranks_refuse_tensor_split_naming_the_sizes(tmp_path):
    fx = get_fixture("moe_r4")
    ranks = launch(3, [fixture_case("moe_r4", "tensor")], tmp_path)
    for r in ranks:
        assert r["moe_r4"].get("error") == (
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
