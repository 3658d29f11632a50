"""The MTP head (model/mtp.py) against llama.cpp's own: graph_mtp, the head draft-mtp runs.

The reference rows in tests/data/<name>.llamacpp.npz were written by `python -m fixtures.llamacpp_mtp`,
which builds the llama.cpp vendored in llama-cpp-python's sdist and runs its Qwen3.5 trunk and MTP
head on llama.cpp's own f32 conversion of the fixture checkpoint (too slow to build in the suite, so
the rows are committed, with the checkpoint's sha256). Teacher-forced rows pair h_i with token i+1 at
position i; the last N_CHAIN rows chain the head on its own output, fed the tokens llama.cpp drafted.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from fixtures.llamacpp_mtp import NAMES, data_path, weights_sha256
from fixtures.mtp import get_mtp_fixture

from model import load_model

# fp32 on both sides from the same bf16 weights; only the order of fp32 sums differs (ggml's dot
# products against MLX's BLAS). Measured <= 9.3e-7 of a row's range (dense 3.8e-7, MoE 9.3e-7). For
# scale: llama.cpp on the bf16 GGUF, where ggml rounds activations to bf16, is 2e-3 (dense) and
# 3.5e-3 (MoE) away.
TOL = 1e-5


def reference(name: str) -> dict:
    with np.load(data_path(name)) as f:
        return {k: f[k] for k in f.files}


def head_logits(model, ids: list[int], chain: list[int]) -> mx.array:
    """[T-1+len(chain), V]: teacher-forced rows, then drafts chained on the head's own output."""
    t = mx.array(ids)[None]
    _, hidden = model(t, return_hidden=True)
    cache = model.make_mtp_cache(1)
    out, _ = model.draft(hidden[:, :-1], t[:, 1:], cache)
    rows, h = [out], hidden[:, -1:]
    for token in chain:
        out, h = model.draft(h, mx.array([[token]]), cache)
        rows.append(out)
    return mx.concatenate(rows, axis=1)[0].astype(mx.float32)


@pytest.mark.parametrize("name", NAMES)
def test_mtp_head_matches_llama_cpp(name):
    ref = reference(name)
    fx = get_mtp_fixture(name)
    assert weights_sha256(fx.hf_dir) == str(ref["weights_sha256"]), (
        f"{name}'s checkpoint is not the one the llama.cpp rows were made from: "
        "rerun `python -m fixtures.llamacpp_mtp`")
    np.testing.assert_array_equal(fx.prompt_ids, ref["prompt_ids"])

    ours = head_logits(load_model(fx.hf_dir, dtype="float32"), fx.prompt_ids.tolist(),
                       ref["chain_tokens"].tolist())
    top_ids, top, scale = mx.array(ref["top_ids"]), ref["top_logits"], ref["row_range"]
    assert ours.shape[0] == top.shape[0]
    at_top = np.array(mx.take_along_axis(ours, top_ids, axis=-1))
    err = (np.abs(at_top - top) / scale[:, None]).max()
    assert err <= TOL, f"top-{top.shape[1]} logits differ by {err:.2e} of the row range"
    # no token outside llama.cpp's top rows rises into them
    outside = np.array(mx.put_along_axis(ours, top_ids, mx.array(-np.inf), axis=-1).max(-1))
    rise = ((outside - top[:, -1]) / scale).max()
    assert rise <= TOL, f"a token outside llama.cpp's top rows is {rise:.2e} of the row range above them"
    err = (np.abs(np.array(mx.logsumexp(ours, axis=-1)) - ref["logsumexp"]) / scale).max()
    assert err <= TOL, f"logsumexp differs by {err:.2e} of the row range"
    # the drafts llama.cpp would make, wherever its top two are further apart than the tolerance
    clear = (top[:, 0] - top[:, 1]) / scale > 2 * TOL
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.array(mx.argmax(ours, axis=-1))[clear], ref["top_ids"][clear, 0])
