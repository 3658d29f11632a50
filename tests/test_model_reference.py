"""Our MLX model against transformers' fp32 logits on every fixture shape, and the invariants that
the engine relies on (chunked == one-shot == token by token; batched == solo)."""

import mlx.core as mx
import numpy as np
import pytest
from fixtures import FIXTURES, get_fixture

from model import load_model

GREEDY_TOKENS = 24


@pytest.fixture(scope="module", params=FIXTURES)
def case(request):
    fx = get_fixture(request.param)
    return fx, load_model(fx.hf_dir, dtype="float32")


def logits(model, ids, cache=None):
    return np.array(model(mx.array(ids)[None], cache).astype(mx.float32))[0]


def relative_error(ours, ref):
    span = ref.max(axis=-1) - ref.min(axis=-1)
    return (np.abs(ours - ref).max(axis=-1) / span).max()


def test_fp32_logits_match_transformers(case):
    fx, model = case
    ours = logits(model, fx.prompt_ids)
    assert ours.shape == fx.ref_logits.shape
    assert len(fx.prompt_ids) >= 64
    assert relative_error(ours, fx.ref_logits) <= 1e-3


def test_greedy_tokens_match_transformers(case):
    fx, model = case
    cache = model.make_cache()
    last = logits(model, fx.prompt_ids, cache)[-1]
    out = []
    for _ in range(GREEDY_TOKENS):
        token = int(last.argmax())
        out.append(token)
        last = logits(model, [token], cache)[-1]
    assert out == [int(t) for t in fx.greedy_ids[:GREEDY_TOKENS]]


def test_bf16_cosine(case):
    fx, _ = case
    model = load_model(fx.hf_dir, dtype="bfloat16")
    ours = logits(model, fx.prompt_ids)
    ref = fx.ref_logits
    cos = (ours * ref).sum(-1) / (np.linalg.norm(ours, axis=-1) * np.linalg.norm(ref, axis=-1))
    assert cos.min() >= 0.999


def test_chunked_prefill_and_decode_equal_one_shot(case):
    fx, model = case
    ids = fx.prompt_ids
    whole = logits(model, ids)
    cache = model.make_cache()
    by7 = np.concatenate([logits(model, ids[s : s + 7], cache) for s in range(0, len(ids), 7)])
    cache = model.make_cache()
    by1 = np.concatenate([logits(model, ids[t : t + 1], cache) for t in range(len(ids))])
    assert relative_error(by7, whole) <= 1e-4
    assert relative_error(by1, whole) <= 1e-4


def test_ragged_batch_equals_solo(case):
    fx, model = case
    ids = np.asarray(fx.prompt_ids)
    seqs = [ids, ids[:45][::-1].copy(), ids[7:30]]
    T = max(len(s) for s in seqs)
    tokens = np.zeros((3, T), dtype=np.int32)
    for row, s in enumerate(seqs):
        tokens[row, : len(s)] = s
    cache = model.make_cache(3)
    batched = np.array(model(mx.array(tokens), cache, lengths=[len(s) for s in seqs]))
    solo_caches = [model.make_cache() for _ in seqs]
    solos = [logits(model, s, c) for s, c in zip(seqs, solo_caches)]
    for row, s in enumerate(seqs):
        assert relative_error(batched[row, : len(s)], solos[row]) <= 1e-5

    # One decode step continues each row from its own length, as each row's own cache does.
    nxt = [int(solo[-1].argmax()) for solo in solos]
    step = np.array(model(mx.array(nxt)[:, None], cache))
    for row, s in enumerate(seqs):
        solo = logits(model, [nxt[row]], solo_caches[row])[-1]
        assert relative_error(step[row, 0], solo) <= 1e-4


def test_snapshot_restore_continues_exactly(case):
    fx, model = case
    ids = fx.prompt_ids
    whole = logits(model, ids)
    cache = model.make_cache(2)
    tokens = np.stack([ids[:40], ids[:40][::-1]]).astype(np.int32)
    model(mx.array(tokens), cache)
    snap = cache.snapshot(0)
    del cache
    restored = model.make_cache(1)
    restored = type(restored).concat([snap])
    rest = logits(model, ids[40:], restored)
    assert relative_error(rest, whole[40:]) <= 1e-4
    assert snap.offsets == [40] and snap.nbytes > 0


def test_last_only_gives_each_rows_last_logits(case):
    fx, model = case
    ids = np.asarray(fx.prompt_ids)
    lengths = [len(ids), 30, 1]
    tokens = np.zeros((3, len(ids)), dtype=np.int32)
    for row, n in enumerate(lengths):
        tokens[row, :n] = ids[:n]
    full = np.array(model(mx.array(tokens), lengths=lengths))
    last = np.array(model(mx.array(tokens), lengths=lengths, last_only=True))
    assert last.shape == (3, 1, full.shape[-1])
    for row, n in enumerate(lengths):
        assert np.abs(last[row, 0] - full[row, n - 1]).max() <= 1e-5 * np.abs(full[row, n - 1]).max()
