"""Speculative decoding with the MTP head: rollback of a verify forward, the acceptance rule, and the
engine's output with drafting on against the same engine with it off.

The expected values come from first principles: a rollback must leave exactly the state a fresh
forward over the accepted tokens leaves, and output with drafting must equal output without it at
temperature 0 (drafting may only change speed); with sampling, the emitted tokens must follow the
main model's distribution (a chi-square test against that distribution, fixed seeds)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from fixtures.mtp import MTP_FIXTURES, get_mtp_fixture
from server_harness import drive

from model.cache import DecodeBatch

K = 3
# Every test runs on these two; the other shapes run the exactness tests (rollback, greedy output,
# a rejection at every position) with fewer tokens and one K: a few seconds each.
FULL = ("mtp_dense", "mtp_moe")


@pytest.fixture(scope="module", params=MTP_FIXTURES)
def shape(request):
    return request.param


@pytest.fixture(scope="module")
def tokenizer():
    from model.loader import load_tokenizer

    return load_tokenizer(get_mtp_fixture(FULL[0]).hf_dir)  # every fixture carries the same one


@pytest.fixture(scope="module")
def mtp_lm(shape, tokenizer):
    from model import load_model

    return load_model(get_mtp_fixture(shape).hf_dir, dtype="float32"), tokenizer


def _solo(model, ids):
    """Reference: a fresh cache fed `ids[:-1]`, then the logits after `ids[-1]`."""
    cache = model.make_cache(1)
    model(mx.array(ids[:-1])[None], cache)
    return np.array(model(mx.array(ids[-1:])[None], cache)[0, -1])


def test_rollback_to_every_position_equals_a_fresh_forward(shape, mtp_lm):
    """Two decode rows at different lengths: row 0 verifies K+1 positions, row 1 feeds one (ragged);
    after keeping the first `kept` positions of row 0, both rows' next logits are their solo ones."""
    model = mtp_lm[0]
    ids = get_mtp_fixture(shape).prompt_ids.tolist()
    n0, n1 = 9, 14
    for kept in range(1, K + 2):
        batch = None
        for n in (n0, n1):
            cache = model.make_cache(1)
            model(mx.array(ids[:n])[None], cache)
            batch = DecodeBatch(cache) if batch is None else (batch.join(cache) or batch)
        batch.fit(K + 1)
        fed = [K + 1, 1]
        rows = [ids[n0 : n0 + K + 1], ids[n1 : n1 + 1] + [0] * K]
        model(mx.array(rows), batch, lengths=fed, keep_states=True)
        batch.rollback([kept, 1], fed)
        assert batch.offsets == [n0 + kept, n1 + 1]
        nxt = [ids[n0 + kept], ids[n1 + 1]]
        batch.fit(1)
        out = np.array(model(mx.array(nxt)[:, None], batch)[:, -1])
        np.testing.assert_allclose(out[0], _solo(model, ids[: n0 + kept + 1]), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(out[1], _solo(model, ids[: n1 + 2]), atol=1e-5, rtol=1e-5)


# chi-square critical values at alpha = 1e-3 (standard tables), by degrees of freedom
CHI2_CRIT = {4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def _chi2(counts: np.ndarray, p: np.ndarray) -> tuple[float, int]:
    keep = p > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was emitted"
    n = counts.sum()
    return float((((counts - n * p) ** 2)[keep] / (n * p[keep])).sum()), int(keep.sum() - 1)


def _p(logits, temperature, top_k):
    """First principles: softmax(logits / T) over the top_k largest."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z[np.argsort(-z)[top_k:]] = -np.inf
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize("draft0", [0, 3, 7])  # the likeliest token, a middling one, one top-k excludes
def test_emitted_tokens_follow_the_main_models_distribution(draft0):
    from server.engine.speculative import accept_sampled

    rng = np.random.default_rng(1234)
    V, N = 8, 40000
    l0 = np.array([3.0, 2.2, 2.0, 1.5, 1.0, 0.5, -0.5, -1.0])
    l1 = np.array([0.1, 1.7, -0.3, 2.5, 0.9, 1.2, 0.0, 2.0])
    probs = np.stack([_p(l0, 0.8, 6), _p(l1, 0.8, 6), _p(l0[::-1], 0.8, 6)])
    drafts = [draft0, 3]  # the second position's p given the first draft accepted, then the bonus's
    first, second = np.zeros(V, int), np.zeros(V, int)
    for u in rng.random((N, 6)):
        out = accept_sampled(probs, drafts, u)
        first[out[0]] += 1
        if out[0] == draft0:
            assert len(out) in (2, 3) and (len(out) == 3) == (out[1] == 3)
            second[out[1]] += 1
        else:
            assert len(out) == 1
    stat, df = _chi2(first, probs[0])
    assert stat < CHI2_CRIT[df], (stat, first / N, probs[0])
    if probs[0][draft0] > 0:
        stat, df = _chi2(second, probs[1])
        assert stat < CHI2_CRIT[df], (stat, second / second.sum(), probs[1])
    else:
        assert second.sum() == 0


def test_the_sampler_verifies_against_what_plain_decoding_draws_from():
    """Sampler.target (what `accept` reads) is the processed distribution: penalties on the output
    so far plus the drafts ahead of the position, temperature, top-k, min-p."""
    from server.engine.request import Request, SamplingParams
    from server.engine.sampler import Sampler

    raw = np.array([3.0, 2.2, 2.0, 1.5, 1.0, 0.5, -0.5, -1.0], dtype=np.float32)
    params = SamplingParams(temperature=0.7, top_k=6, presence_penalty=0.5, frequency_penalty=0.25, seed=3)
    req = Request("r", [5, 6], params, output_ids=[1, 1])
    final, _ = Sampler().target(mx.array(raw), req, ahead=[2])
    expected = raw.astype(np.float64) - [0, 0.5 + 2 * 0.25, 0.5 + 0.25, 0, 0, 0, 0, 0]
    p = np.array(mx.softmax(final))
    np.testing.assert_allclose(p, _p(expected, 0.7, 6), atol=1e-6)


# ---- the engine: output with drafting equals output without it ----

def _engine_run(lm, reqs, arrive=None, core=None, **cfg):
    """Drive EngineCore step by step; reqs = [(prompt, params)]; arrive[i] = step of submission.
    Returns each request's tokens (with their logprobs where asked) and the core."""
    from server.engine import EngineConfig, EngineCore

    model, tok = lm
    if core is None:
        cfg = {"prefix_cache_bytes": 0, "block_size": 16, **cfg}
        core = EngineCore(model, tok, EngineConfig(memory_budget_bytes=1 << 30, prefill_tokens_per_step=48, **cfg))
    deltas = drive(core, reqs, arrive)
    out = [[t for d in ds for t in d.token_ids] for ds in deltas]
    logprobs = [[lp.logprob for d in ds for lp in d.logprobs] for ds in deltas]
    return ([(o, lp) for o, lp in zip(out, logprobs)] if any(logprobs) else out), core


def _same(spec, plain):
    """Same tokens, and logprobs within float32 noise: a wrong state shows in the logits even
    where a tiny random model's argmax does not move."""
    assert [t for t, _ in spec] == [t for t, _ in plain]
    np.testing.assert_allclose(np.array([lp for _, lp in spec]), np.array([lp for _, lp in plain]), atol=2e-4)


def _prompts(model, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, model.config.vocab_size, size=int(k)).tolist() for k in rng.integers(5, 60, size=n)]


def test_greedy_output_with_drafting_equals_plain_decoding(shape, mtp_lm):
    """A random head accepts little, so this mostly checks rollback: single requests at K = 1 and 3
    (2 on the other shapes; the second run of a prompt hits the prefix cache: the head then starts
    after the hit), and a batch of 8 arriving at different steps."""
    from server.engine import SamplingParams

    full = shape in FULL
    params = SamplingParams(temperature=0.0, max_tokens=10 if full else 6, ignore_eos=True, logprobs=True)
    ps = _prompts(mtp_lm[0], 8)
    plain, _ = _engine_run(mtp_lm, [(p, params) for p in ps[:2]])
    for K in (1, 3) if full else (2,):
        core = None
        for _ in range(2):
            spec, core = _engine_run(mtp_lm, [(p, params) for p in ps[:2]], core=core, num_speculative_tokens=K,
                                     prefix_cache_bytes=64 << 20)
            _same(spec, plain)
        assert core.stats()["prefix_cache"]["hits"] >= 2 and sum(core.drafted) > 0
    arrive = [0, 1, 2, 3, 5, 8, 13, 21] if full else list(range(8))
    plain, _ = _engine_run(mtp_lm, [(p, params) for p in ps], arrive)
    spec, core = _engine_run(mtp_lm, [(p, params) for p in ps], arrive, num_speculative_tokens=3)
    _same(spec, plain)
    assert core.runner.batch is None and core.runner.mtp_batch is None and not core.runner.mtp_input
    assert core.scheduler.reserved_bytes == 0
    # /metrics: drafts and acceptances per position, as the engine counted them
    from server.metrics import Metrics

    text = Metrics(core).render().decode()
    for key, counts in (("drafted", core.drafted), ("accepted", core.accepted)):
        for position, n in enumerate(counts, start=1):
            assert f'deltaserve_spec_decode_{key}_tokens_total{{position="{position}"}} {float(n)}' in text


def test_a_rejection_at_every_draft_position_rolls_back_exactly(shape, mtp_lm):
    """The drafts are replaced by the true greedy continuation with one token changed, at draft
    position 1, 2, 3 or none (rotating per step and row): every acceptance length 0..K occurs, the
    output is still the plain one, and after every step each row's recurrent and conv state and
    offset are those of a fresh forward over the tokens it has kept (on these tiny random models
    a wrong state moves the logprobs by only ~1e-5, so the state is compared directly)."""
    from model.cache import LinearLayer

    from server.engine import SamplingParams

    K, V = 3, mtp_lm[0].config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=14 if shape in FULL else 8, ignore_eos=True, logprobs=True)
    ps = _prompts(mtp_lm[0], 3, seed=1)
    plain, _ = _engine_run(mtp_lm, [(p, params) for p in ps])
    truth = {tuple(p): out for p, (out, _) in zip(ps, plain)}
    from server.engine import EngineConfig, EngineCore

    core = EngineCore(*mtp_lm, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=1 << 30,
                                            num_speculative_tokens=K, speculative_adapt=False))
    real_draft, calls = core.runner.draft, [0]

    def oracle(last, k):
        real, k = real_draft(last, k)  # the head still runs: its KV must follow the rows
        if real is None:
            return None, k
        rows = []
        for b, rid in enumerate(core.runner.rows):
            req = core.requests[rid]
            want = truth[tuple(req.prompt_ids)][len(req.output_ids):][:K]
            want += [0] * (K - len(want))
            bad = (calls[0] + b) % (K + 1)
            if bad < K:
                want[bad] = (want[bad] + 1) % V
            rows.append(want)
        calls[0] += 1
        return mx.array(rows, dtype=mx.uint32), k

    real_commit, checked = core.runner.commit, [0]

    def commit_and_check(kept, fed):
        real_commit(kept, fed)
        model = mtp_lm[0]
        for b, rid in enumerate(core.runner.rows):
            fed = core.requests[rid].all_ids[: core.requests[rid].num_computed]
            fresh = model.make_cache(1)
            model(mx.array(fed)[None], fresh)
            ours = core.runner.batch.snapshot(b)
            assert ours.offsets == fresh.offsets == [len(fed)]
            for a, f in zip(ours.layers, fresh.layers):
                if isinstance(a, LinearLayer):
                    np.testing.assert_allclose(np.array(a.state), np.array(f.state), rtol=1e-4, atol=1e-6)
                    np.testing.assert_allclose(np.array(a.conv), np.array(f.conv), rtol=1e-4, atol=1e-6)
            checked[0] += 1

    core.runner.draft, core.runner.commit = oracle, commit_and_check
    spec, core = _engine_run(mtp_lm, [(p, params) for p in ps], core=core)
    _same(spec, plain)
    lengths = core.accepted
    assert all(a > 0 for a in lengths) and core.accepted[0] < core.drafted[0], (core.drafted, core.accepted)
    assert checked[0] >= 3 * len(ps)  # each row checked after several steps


@pytest.mark.parametrize("shape", FULL, indirect=True)
def test_sampled_requests_with_drafting_stop_and_stream_as_plain_ones(mtp_lm):
    """Seeded sampling (penalties, top-k) with drafting: each request ends at max_tokens or its
    stop token exactly; a stop token among several emitted in one step ends the output there."""
    from server.engine import SamplingParams

    ps = _prompts(mtp_lm[0], 4, seed=2)
    params = [SamplingParams(temperature=0.8, top_k=20, presence_penalty=0.3, max_tokens=9, seed=i, ignore_eos=True)
              for i in range(4)]
    outs, core = _engine_run(mtp_lm, list(zip(ps, params)), num_speculative_tokens=2)
    assert [len(o) for o in outs] == [9] * 4 and sum(core.drafted) > 0
    stop = outs[0][4]
    params = SamplingParams(temperature=0.8, top_k=20, presence_penalty=0.3, max_tokens=9, seed=0,
                            ignore_eos=True, stop_token_ids=[stop])
    (again,), _ = _engine_run(mtp_lm, [(ps[0], params)], num_speculative_tokens=2)
    assert stop in again and again.index(stop) == len(again) - 1 or stop not in again


@pytest.mark.parametrize("config, message", [
    ('{"method": "eagle", "num_speculative_tokens": 2}', 'method must be "mtp"'),
    ('{"method": "mtp", "num_speculative_tokens": 0}', "integer 1..4"),
    ('{"method": "mtp", "num_speculative_tokens": 5}', "integer 1..4"),
    ('{"method": "mtp", "num_speculative_tokens": 2, "draft_model": "x"}', "unknown key(s) draft_model"),
])
def test_speculative_config_is_checked(config, message, capsys):
    from server.cli import main

    assert main(["serve", "--speculative-config", config]) == 2
    assert message in capsys.readouterr().err


def test_a_model_without_mtp_weights_is_refused(capsys):
    from fixtures import get_fixture

    from server.cli import main

    path = str(get_fixture("dense_r2_tied").hf_dir)
    assert main(["serve", path, "--speculative-config", '{"method": "mtp", "num_speculative_tokens": 2}']) == 1
    assert "has no MTP weights" in capsys.readouterr().err


def test_the_demo_models_trained_head_is_accepted_and_changes_nothing(tmp_path_factory):
    """The demo's trained MTP head (demo/train_mtp.py): at temperature 0 the same tokens as plain
    decoding, in fewer steps."""
    from convert import cached_conversion
    from model import load
    from model.demo import DEMO_GGUF
    from server.engine import SamplingParams

    lm = load(cached_conversion(DEMO_GGUF, cache_root=tmp_path_factory.mktemp("converted")), dtype="float32")
    if not lm[0].config.mtp_num_hidden_layers:
        pytest.skip("this demo GGUF carries no MTP head (nextn.*)")
    tok = lm[1]
    ps = [tok.encode(tok.apply_chat_template([{"role": "user", "content": m}], add_generation_prompt=True,
                                             tokenize=False))
          for m in ("What is the capital of France?", "Write a short poem about the sea.")]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain, _ = _engine_run(lm, [(p, params) for p in ps], arrive=[0, 3])
    spec, core = _engine_run(lm, [(p, params) for p in ps], arrive=[0, 3], num_speculative_tokens=2)
    assert spec == plain
    assert core.accepted[0] >= 0.3 * core.drafted[0], (core.drafted, core.accepted)


def test_the_depth_follows_measured_throughput():
    from server.engine.speculative import DepthController

    c = DepthController(2)
    speed = {1: [100, 150, 120], 16: [800, 500, 300]}  # tokens/s per depth: batch 1 likes 1, batch 16 likes 0
    for _ in range(40):
        for rows in (1, 16):
            k = c.choose(rows)
            c.record(rows, k, speed[rows][k], 1.0)
    picks = {rows: [c.choose(rows) for _ in range(300)] for rows in (1, 16)}
    assert picks[1].count(1) >= 290 and picks[16].count(0) >= 290
    assert set(picks[1]) == {0, 1, 2}  # the others are still tried now and then
    assert DepthController(3, adapt=False).choose(64) == 3


def test_measuring_a_losing_depth_costs_little():
    """Where drafting loses (a CPU at batch 16: a speculative step costs 2-4 plain ones), deeper
    depths are not measured at all once depth 1 loses, and depth 1 is retried ever more rarely; where a
    depth wins, it is used nearly always."""
    from server.engine.speculative import DepthController

    for speed, best, rare in (([100, 40, 30, 25], 0, {2: 0, 3: 0}), ([100, 150, 120, 90], 1, {3: 10})):
        c = DepthController(3)
        picks = []
        for step in range(5000):
            k = c.choose(16)
            picks.append(k)
            c.record(16, k, speed[k] * (1 + 0.1 * ((step * 7919) % 13 - 6) / 6), 1.0)  # +-10% noise
        assert picks.count(best) >= 0.99 * len(picks)
        assert all(picks.count(k) <= n for k, n in rare.items()), [picks.count(k) for k in range(4)]
        if best == 0:
            assert picks.count(1) <= 3 + 12  # its 3 first measurements, then retries 64, 128, 256, ... steps apart


@pytest.mark.parametrize("shape", FULL, indirect=True)
def test_cancelling_a_drafting_row_leaves_its_neighbours_alone(mtp_lm):
    from server.engine import EngineConfig, EngineCore, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ps = _prompts(mtp_lm[0], 3, seed=4)
    plain, _ = _engine_run(mtp_lm, [(p, params) for p in ps])
    core = EngineCore(*mtp_lm, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=1 << 30,
                                            num_speculative_tokens=2, speculative_adapt=False))
    events = {}
    core.emit = lambda d: events.setdefault(d.request_id, []).append(d)
    ids = [core.add(p, params).id for p in ps]
    for step in range(40):
        if step == 3:
            core.cancel(ids[1])
        if not core.has_work():
            break
        core.step()
    out = [[t for d in events[i] for t in d.token_ids] for i in ids]
    assert events[ids[1]][-1].finish_reason == "cancelled" and len(out[1]) < 12
    assert [out[0], out[2]] == [plain[0], plain[2]]
    assert core.runner.mtp_batch is None and not core.runner.mtp_input
