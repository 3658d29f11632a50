"""Engine invariants on a real (tiny) model: batched == solo, cached == cold, seeded sampling
independent of the batch, cancellation and admission limits."""

import asyncio
import threading

import mlx.core as mx
import numpy as np
import pytest
from fixtures import get_fixture
from server_harness import ModelSpy, drive, solo_greedy, wait_until

from model import load
from server.engine import Engine, EngineConfig, EngineCore, PromptTooLong, QueueFull, SamplingParams
from server.engine.request import Request

GREEDY = dict(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def lm():
    model, tokenizer = load(get_fixture("moe_r4").hf_dir, dtype="float32")
    return model, tokenizer


def prompts(n, seed=0, lo=5, hi=300):
    rng = np.random.default_rng(seed)
    return [rng.integers(100, 50000, size=int(k)).tolist() for k in rng.integers(lo, hi, size=n)]


def run(lm, reqs, cache_bytes=0, block=32, budget=48, arrive=None, core=None, **cfg):
    """Drive EngineCore step by step; reqs = [(prompt, params)]; arrive[i] = step of submission."""
    model, tok = lm
    if core is None:
        config = EngineConfig(prefix_cache_bytes=cache_bytes, block_size=block, memory_budget_bytes=1 << 30,
                              prefill_tokens_per_step=budget, **cfg)
        core = EngineCore(model, tok, config)
    return drive(core, reqs, arrive), core


def tokens(deltas):
    return [t for d in deltas for t in d.token_ids]


def test_solo_equals_direct_model_greedy(lm):
    p = prompts(1, seed=3)[0]
    (out,), _ = run(lm, [(p, SamplingParams(**GREEDY, ignore_eos=True))])
    assert tokens(out) == solo_greedy(lm[0], p, 12)[0]


def test_batch_of_eight_arriving_at_different_steps_equals_solo(lm):
    ps = prompts(8)
    params = SamplingParams(**GREEDY, ignore_eos=True)
    solo = [tokens(run(lm, [(p, params)])[0][0]) for p in ps]
    batched, core = run(lm, [(p, params) for p in ps], arrive=[0, 1, 2, 3, 5, 8, 13, 21])
    assert [tokens(d) for d in batched] == solo
    assert core.runner.batch is None and core.scheduler.reserved_bytes == 0


def test_new_prompts_prefilled_together_equal_solo(lm):
    model, tok = lm
    ps = prompts(6, seed=4, lo=20, hi=40) + prompts(2, seed=6, lo=90, hi=100)
    params = SamplingParams(**GREEDY, ignore_eos=True)
    solo = [tokens(run(lm, [(p, params)])[0][0]) for p in ps]
    core = EngineCore(model, tok, EngineConfig(prefix_cache_bytes=1 << 28, block_size=32, memory_budget_bytes=1 << 30,
                                               prefill_tokens_per_step=4096))
    core.runner.model = spy = ModelSpy(model)
    out, _ = run(lm, [(p, params) for p in ps], core=core)
    assert [tokens(d) for d in out] == solo
    batched = [s for s in spy.shapes if s[0] > 1 and s[1] > 1]
    assert batched, "the new prompts were prefilled one by one"
    assert sum(s[0] for s in batched) >= 6


@pytest.mark.parametrize("cache_bytes", [1 << 28, 200_000])  # roomy, and small enough to evict
def test_prefix_cache_gives_cold_results(lm, cache_bytes):
    ps = prompts(4, seed=1, lo=40, hi=200)
    params = SamplingParams(**GREEDY, ignore_eos=True)
    cold = [tokens(run(lm, [(p, params)])[0][0]) for p in ps]
    extended = [p + [7, 8, 9] for p in ps]  # resumes mid-block from the end-of-prompt snapshot
    cold_ext = [tokens(run(lm, [(p, params)])[0][0]) for p in extended]
    reqs = [(p, params) for p in ps + ps + extended]
    out, core = run(lm, reqs, cache_bytes=cache_bytes, arrive=list(range(0, 36, 3)))
    assert [tokens(d) for d in out] == cold + cold + cold_ext
    usage = [d[-1].usage for d in out]
    if cache_bytes == 1 << 28:
        assert all(u.cached_tokens == len(p) for u, p in zip(usage[4:8], ps))  # full hits
        assert all(u.cached_tokens >= len(p) for u, p in zip(usage[8:], ps))  # mid-block hits
    else:
        assert core.prefix_cache.evictions > 0
        assert core.prefix_cache.nbytes <= cache_bytes


def test_chat_next_turn_hits_previous_turn(lm):
    model, _ = lm
    params = SamplingParams(**GREEDY, ignore_eos=True)
    turn1 = prompts(1, seed=5, lo=60, hi=61)[0]
    (out1,), core = run(lm, [(turn1, params)], cache_bytes=1 << 28)
    answer = tokens(out1)
    turn2 = turn1 + answer + [11, 12, 13, 14]
    (out2,), _ = run(lm, [(turn2, params)], core=core)
    assert out2[-1].usage.cached_tokens >= len(turn1) + len(answer) - 1
    assert tokens(out2) == tokens(run(lm, [(turn2, params)])[0][0])
    # a client that re-renders the previous turn differently still reuses the shared prefix
    turn2b = turn1[:50] + [3, 1, 4, 1, 5] + answer
    (out3,), _ = run(lm, [(turn2b, params)], core=core)
    assert 32 <= out3[-1].usage.cached_tokens <= 50
    assert tokens(out3) == tokens(run(lm, [(turn2b, params)])[0][0])


def test_snapshot_where_the_history_ends(lm):
    """A prompt's requested snapshot point (where a chat template's generation prompt begins) is
    what a next turn that re-renders everything after it resumes from."""
    model, tok = lm
    params = SamplingParams(**GREEDY, ignore_eos=True)
    history = prompts(1, seed=9, lo=70, hi=71)[0]  # not a multiple of the block size
    turn1 = history + [21, 22, 23]  # + the generation prompt
    core = EngineCore(model, tok, EngineConfig(prefix_cache_bytes=1 << 28, block_size=32, memory_budget_bytes=1 << 30,
                                               prefill_tokens_per_step=48))
    core.add(turn1, params, snapshot_at=(len(history),))
    run(lm, [], core=core)
    turn2 = history + [21, 30, 31, 32]  # the previous answer rendered differently, then the next question
    (out,), _ = run(lm, [(turn2, params)], core=core)
    assert out[-1].usage.cached_tokens == len(history)
    assert tokens(out) == tokens(run(lm, [(turn2, params)])[0][0])


def test_seeded_sampling_independent_of_batch(lm):
    ps = prompts(4, seed=2)
    seeded = SamplingParams(temperature=8.0, top_p=0.99, top_k=2000, max_tokens=10, seed=1234, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    alone = tokens(run(lm, [(ps[0], seeded)])[0][0])
    mixed, _ = run(lm, [(ps[1], other), (ps[0], seeded), (ps[2], other), (ps[3], seeded)], arrive=[0, 2, 2, 4])
    assert tokens(mixed[1]) == alone
    different_seed = SamplingParams(**{**seeded.__dict__, "seed": 99})
    assert tokens(run(lm, [(ps[0], different_seed)])[0][0]) != alone


def test_stop_string_is_cut_and_never_emitted(lm):
    model, tok = lm
    p = prompts(1, seed=7)[0]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = "".join(d.text for d in run(lm, [(p, params)])[0][0])
    assert len(full) > 8
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    (out,), _ = run(lm, [(p, SamplingParams(**{**params.__dict__, "stop": [stop]}))])
    text = "".join(d.text for d in out)
    assert text == full[: full.find(stop)]
    assert out[-1].finish_reason == "stop"


def test_logits_processor_forces_tokens(lm):
    p = prompts(1, seed=8)[0]
    forced = [1000, 2000, 3000]

    def force(generated, logits):
        mask = mx.full(logits.shape, -float("inf"))
        mask[forced[len(generated) % 3]] = 0.0
        return logits + mask

    params = SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True, logits_processors=[force])
    (out,), _ = run(lm, [(p, params)])
    assert tokens(out) == forced * 2


def test_logprobs_are_normalised(lm):
    p = prompts(1, seed=9)[0]
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=True, top_logprobs=5)
    (out,), _ = run(lm, [(p, params)])
    lps = [lp for d in out for lp in d.logprobs]
    assert len(lps) == 3
    for lp in lps:
        assert lp.top[0][0] == lp.token_id and abs(lp.top[0][1] - lp.logprob) < 1e-6
        assert lp.logprob <= 0 and sum(np.exp(v) for _, v in lp.top) <= 1 + 1e-5


def test_cancel_frees_slot_and_memory_within_one_step(lm):
    model, tok = lm
    core = EngineCore(model, tok, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=1 << 30))
    events = []
    core.emit = events.append
    a = core.add(prompts(1)[0], SamplingParams(max_tokens=100, ignore_eos=True))
    b = core.add(prompts(1, seed=1)[0], SamplingParams(max_tokens=100, ignore_eos=True))
    for _ in range(3):
        core.step()
    assert len(core.runner.rows) == 2
    core.cancel(a.id)
    core.step()
    assert core.runner.rows == [b.id]
    assert core.scheduler.reserved_bytes == b.reserved_bytes
    assert [e.finish_reason for e in events if e.request_id == a.id][-1] == "cancelled"


def test_admission_limits(lm):
    model, tok = lm
    config = EngineConfig(max_num_seqs=1, max_queue=2, max_model_len=64, prefix_cache_bytes=0,
                          memory_budget_bytes=1 << 30)
    core = EngineCore(model, tok, config)
    with pytest.raises(PromptTooLong, match="context limit is 64"):
        core.add(list(range(100, 170)), SamplingParams())
    core.add([1, 2, 3], SamplingParams())
    core.add([1, 2, 3], SamplingParams())
    with pytest.raises(QueueFull):
        core.add([1, 2, 3], SamplingParams())
    small = EngineCore(model, tok, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=10_000))
    with pytest.raises(PromptTooLong, match="memory budget"):
        small.add(list(range(100, 140)), SamplingParams(max_tokens=1000))
    with pytest.raises(ValueError, match="top_p"):
        core.add([1], SamplingParams(top_p=0))


def test_threaded_engine_async_stream_and_close_cancels(lm):
    model, tok = lm
    engine = Engine(model, tok, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=1 << 30))
    try:
        p = prompts(1, seed=4)[0]

        async def main():
            stream = engine.submit(p, SamplingParams(**GREEDY, ignore_eos=True))
            got = [d async for d in stream]
            long = engine.submit(p, SamplingParams(max_tokens=10_000, ignore_eos=True))
            async for _ in long:
                break  # leaving early closes the stream, which cancels the request
            return got

        got = asyncio.run(main())
        assert tokens(got) == solo_greedy(model, p, 12)[0]
        assert got[-1].finish_reason == "length" and got[-1].usage.completion_tokens == 12
        for _ in range(200):
            if engine.stats()["running"] == 0:
                break
            asyncio.run(asyncio.sleep(0.01))
        assert engine.stats()["running"] == 0 and engine.stats()["reserved_bytes"] == 0
    finally:
        engine.shutdown()


def test_stop_ends_a_request_with_stop_and_its_usage(lm):
    """Engine.stop (the server matched a chat stop sequence itself): unlike a cancel, the stream
    gets a last delta, finish_reason "stop", with the tokens generated so far counted."""
    model, tok = lm
    engine = Engine(model, tok, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=1 << 30))
    try:
        stream = engine.submit(prompts(1, seed=5)[0], SamplingParams(max_tokens=10_000, ignore_eos=True))
        got = []
        for d in stream:
            got.append(d)
            if len(got) == 3:
                engine.stop(stream.request_id)
        last = got[-1]
        assert last.finish_reason == "stop" and not last.token_ids
        generated = sum(len(d.token_ids) for d in got)
        assert 3 <= generated < 100 and last.usage.completion_tokens == generated
        assert wait_until(lambda: engine.stats()["running"] == 0)
    finally:
        engine.shutdown()


def test_submit_cancel_and_stats_never_wait_for_a_step(lm):
    """The HTTP event loop calls submit, cancel and stats: a long step must not block them. The
    step is held open here until the test lets it go, so the old lock-for-a-step design hangs."""
    model, tok = lm
    engine = Engine(model, tok, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=1 << 30, max_queue=3))
    inside, release = threading.Event(), threading.Event()
    step = engine.core.step

    def held_step():
        inside.set()
        release.wait(60)
        step()

    engine.core.step = held_step
    try:
        p = prompts(3, seed=6)
        first = engine.submit(p[0], SamplingParams(**GREEDY, ignore_eos=True))
        assert inside.wait(30)
        outcome = {}

        def caller():
            second = engine.submit(p[1], SamplingParams(**GREEDY, ignore_eos=True))
            third = engine.submit(p[2], SamplingParams(**GREEDY, ignore_eos=True))
            try:  # the first waits in the scheduler, two more in the inbox: the queue of 3 is full
                engine.submit(p[0], SamplingParams(**GREEDY))
            except QueueFull:
                outcome["full"] = True
            engine.cancel(third.request_id)
            try:  # its reader has gone, but it has not ended yet: the id is still taken
                engine.submit(p[2], SamplingParams(**GREEDY), request_id=third.request_id)
            except ValueError:
                outcome["taken"] = True
            outcome.update(stats=engine.stats(), second=second)

        t = threading.Thread(target=caller, daemon=True)
        t.start()
        t.join(10)
        assert outcome.get("stats") is not None, "submit, cancel or stats waited for the step in progress"
        assert outcome["full"] and outcome["taken"] and outcome["stats"]["steps"] == 0
        release.set()
        assert tokens(list(first)) == solo_greedy(model, p[0], 12)[0]
        assert tokens(list(outcome["second"])) == solo_greedy(model, p[1], 12)[0]
        assert wait_until(lambda: engine.stats()["running"] + engine.stats()["waiting"] == 0)
    finally:
        release.set()
        engine.shutdown()


def test_decoding_ahead_changes_nothing_but_timing(lm):
    """With the next step launched before this one's tokens are read: the same tokens, logprobs and
    finish reasons for greedy, seeded and penalised requests arriving mid-decode, with rows finishing
    at different steps (the prefix cache's next-turn hits run with it on by default)."""
    ps = prompts(6, seed=7, lo=20, hi=120)
    params = [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=14, ignore_eos=True, logprobs=True),
              SamplingParams(temperature=0.7, seed=5, max_tokens=6, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, top_logprobs=2),
              SamplingParams(temperature=1.0, seed=3, max_tokens=17, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True)]
    reqs, arrive = list(zip(ps, params)), [0, 0, 2, 6, 9, 15]

    def outcome(ahead):
        out, core = run(lm, reqs, cache_bytes=1 << 28, arrive=arrive, decode_ahead=ahead)
        summary = [(tokens(d), [(lp.token_id, round(lp.logprob, 5), len(lp.top)) for x in d for lp in x.logprobs],
                    d[-1].finish_reason) for d in out]
        return summary, core

    ahead, core = outcome(True)
    plain, _ = outcome(False)
    assert ahead == plain
    assert len({len(t) for t, _, _ in ahead}) > 3  # finishing at different steps
    assert core.runner.pending is None and core.runner.batch is None


def failing_after(n):
    """A logits processor that raises once the request has `n` tokens."""
    def proc(generated, logits):
        if len(generated) >= n:
            raise RuntimeError("this request's processor failed")
        return logits
    return proc


def test_a_failing_request_ends_alone(lm):
    """One request's error (its processor, on its first token or in the decode batch) ends that
    request with finish_reason "error"; the others finish with exactly their solo output."""
    ps = prompts(4, seed=11)
    greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    solo = [tokens(run(lm, [(ps[0], greedy)])[0][0]), tokens(run(lm, [(ps[2], seeded)])[0][0])]
    late = SamplingParams(**{**greedy.__dict__, "logits_processors": [failing_after(3)]})
    first = SamplingParams(**{**greedy.__dict__, "logits_processors": [failing_after(0)]})
    out, core = run(lm, [(ps[0], greedy), (ps[1], late), (ps[2], seeded), (ps[3], first)], arrive=[0, 0, 1, 4])
    assert [tokens(out[0]), tokens(out[2])] == solo
    assert [d.finish_reason for d in out[0] + out[2] if d.finish_reason] == ["length", "length"]
    assert out[1][-1].finish_reason == "error" and len(tokens(out[1])) == 3
    assert out[3][-1].finish_reason == "error" and tokens(out[3]) == []
    assert not core.requests and not core.runner.rows and core.scheduler.reserved_bytes == 0


def test_a_seed_the_sampler_refuses_ends_that_request_alone(lm):
    """A seed outside what mx.random.key takes is refused by SamplingParams.validate; one that
    reaches the engine anyway (as -1 once did) ends its own request, not the batch."""
    model, tok = lm
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=-1).validate()
    ps = prompts(2, seed=12)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    solo = tokens(run(lm, [(ps[0], greedy)])[0][0])
    core = EngineCore(model, tok, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=1 << 30))
    events = {}
    core.emit = lambda d: events.setdefault(d.request_id, []).append(d)
    good = core.add(ps[0], greedy)
    core.step()
    core.step()
    bad = Request("bad-seed", ps[1], SamplingParams(temperature=1.0, max_tokens=8, seed=-1))
    core.enqueue(bad)  # past validation
    while core.has_work():
        core.step()
    assert tokens(events[good.id]) == solo and events[good.id][-1].finish_reason == "length"
    assert [d.finish_reason for d in events[bad.id]] == ["error"]


class PoisonedModel(ModelSpy):
    """The model, raising on any forward whose input holds the POISON token."""

    POISON = 77

    def __call__(self, tokens, *args, **kwargs):
        if (tokens == self.POISON).any().item():
            raise RuntimeError("poisoned input")
        return super().__call__(tokens, *args, **kwargs)


def test_a_prefill_batch_that_fails_is_retried_row_by_row(lm):
    """New prompts prefill as one batch; when it raises, each row runs alone, so only the row
    whose own forward fails ends (with "error") and the others answer as solo."""
    model, tok = lm
    ps = [list(range(200, 212)), list(range(300, 311)), list(range(400, 410)) + [PoisonedModel.POISON, 401]]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    solo = [tokens(run(lm, [(p, greedy)])[0][0]) for p in ps[:2]]
    spy = PoisonedModel(model)
    core = EngineCore(spy, tok, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=1 << 30))
    out, _ = run(lm, [(p, greedy) for p in ps], core=core)
    assert [tokens(o) for o in out[:2]] == solo
    assert out[2][-1].finish_reason == "error"
    assert (3, 12) not in spy.shapes and (1, 12) in spy.shapes  # the batch raised; the rows ran alone
    assert not core.requests and not core.runner.rows


def test_a_grammar_mask_holds_whatever_the_sampling(lm):
    """Sampling values whose float32 arithmetic overflows (a temperature or repetition penalty of
    1e-300 is 0 in float32: x / 0 is inf, -inf * 0 is NaN) never pick a token a logits processor
    masked; when nothing allowed is left, the allowed token rated highest is chosen."""
    p = prompts(1, seed=13)[0]
    allowed = [p[0], p[1], 1000, 2000]  # the prompt's tokens: the repetition penalty touches them

    def only(generated, logits):
        mask = mx.full(logits.shape, -float("inf"))
        mask[mx.array(allowed)] = 0.0
        return logits + mask

    for extreme in [dict(temperature=1e-300), dict(temperature=0.7, repetition_penalty=1e-300),
                    dict(temperature=1e-300, repetition_penalty=1e-300, top_p=1e-300),
                    dict(temperature=0.0, repetition_penalty=1e-300), dict(temperature=2.0, min_p=1.0, top_k=1),
                    dict(temperature=1.0, frequency_penalty=1e30, presence_penalty=-1e30)]:
        params = SamplingParams(max_tokens=8, ignore_eos=True, seed=3, logits_processors=[only], **extreme)
        (out,), _ = run(lm, [(p, params)])
        assert set(tokens(out)) <= set(allowed), extreme
