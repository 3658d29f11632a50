"""server.engine.disk_cache.DiskCache: the prefix cache's disk tier on its own. Expected bytes come
from the arrays put in (their buffers), and the files are read back with safetensors' own reader."""

import os
import time

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from server.engine.disk_cache import DiskCache

FP = "0123456789abcdef"
HKV, D, N_ATTN, N_LINEAR = 2, 8, 2, 3


def _full(n, dtype, seed=0):
    """KV for n positions of N_ATTN layers, [1, HKV, n, D] each, evaluated."""
    mx.random.seed(seed)
    kv = [(mx.random.normal((1, HKV, n, D)).astype(dtype), mx.random.normal((1, HKV, n, D)).astype(dtype))
          for _ in range(N_ATTN)]
    mx.eval(kv)
    return kv


def _state(dtype, seed=1):
    mx.random.seed(seed)
    st = [(mx.random.normal((1, 3, 24)).astype(dtype), mx.random.normal((1, 2, 32, 32)).astype(mx.float32))
          for _ in range(N_LINEAR)]
    mx.eval(st)
    return st


def _seg(kv, a, b):
    out = [(k[:, :, a:b], v[:, :, a:b]) for k, v in kv]  # slices of a larger array, as the engine has them
    mx.eval(out)
    return out


def _bytes(a):
    return memoryview(a).tobytes()


def _files(d):
    return sorted(p for p in d.iterdir() if p.suffix == ".safetensors")


def _chain(cache, tokens, kv, state, logits, cut):
    """Two segments: [0, cut) KV only, [cut, len) with state and logits."""
    cache.put(tokens[:cut], 0, _seg(kv, 0, cut), None, None)
    cache.put(tokens, cut, _seg(kv, cut, len(tokens)), state, logits)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_restart_finds_the_chain_and_load_is_byte_identical(tmp_path, dtype):
    tokens = list(range(100, 109))
    kv, state = _full(9, dtype), _state(dtype)
    logits = mx.random.normal((50,)).astype(dtype)
    mx.eval(logits)
    first = DiskCache(tmp_path, 1 << 30, FP)
    _chain(first, tokens, kv, state, logits, 5)
    first.close()
    assert len(_files(tmp_path)) == 2

    again = DiskCache(tmp_path, 1 << 30, FP)
    assert again.kv_covered(tokens) == 9
    assert again.kv_covered(tokens + [7, 8]) == 9
    assert again.kv_covered(tokens[:7]) == 5  # only the KV-only segment lies inside
    assert again.lookup(tokens) == 9 and again.lookup(tokens + [1]) == 9
    assert again.lookup(tokens[:7]) == 0  # position 5 has no state
    other = tokens[:3] + [0] + tokens[4:]
    assert again.kv_covered(other) == 0 and again.lookup(other) == 0
    kv2, state2, logits2 = again.load(tokens, 9)
    for (k, v), (k2, v2) in zip(kv, kv2):
        assert k2.dtype == dtype and k2.shape == (1, HKV, 9, D)
        assert _bytes(k2) == _bytes(k) and _bytes(v2) == _bytes(v)
    assert [(_bytes(c), _bytes(r)) for c, r in state2] == [(_bytes(c), _bytes(r)) for c, r in state]
    assert _bytes(logits2) == _bytes(logits)
    s = again.stats()
    assert s["hits"] == 2 and s["misses"] == 2 and s["files"] == 2 and s["errors"] == 0
    assert s["bytes"] == sum(p.stat().st_size for p in _files(tmp_path))
    assert s["read_bytes"] == sum(p.stat().st_size for p in _files(tmp_path))
    again.close()


def test_files_are_standard_safetensors(tmp_path):
    tokens = list(range(6))
    kv, state = _full(6, mx.float32), _state(mx.float32)
    cache = DiskCache(tmp_path, 1 << 30, FP)
    cache.put(tokens, 0, kv, state, None)
    cache.close()
    (path,) = _files(tmp_path)
    tensors = load_file(path)  # safetensors' own reader
    np.testing.assert_array_equal(tensors["kv.1.values"], np.array(kv[1][1]))
    np.testing.assert_array_equal(tensors["state.2.recurrent"], np.array(state[2][1]))
    with safe_open(path, framework="numpy") as f:
        assert f.metadata()["fingerprint"] == FP and f.metadata()["end"] == "6"


def _flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))


@pytest.mark.parametrize("damage", ["flip data", "flip header", "truncate", "truncate to nothing"])
def test_a_corrupt_file_is_ignored_and_removed_with_its_chain(tmp_path, damage):
    tokens = list(range(50, 60))
    kv, state = _full(10, mx.float32), _state(mx.float32)
    cache = DiskCache(tmp_path, 1 << 30, FP)
    cache.put(tokens[:4], 0, _seg(kv, 0, 4), None, None)
    cache.close()
    (root,) = _files(tmp_path)
    cache = DiskCache(tmp_path, 1 << 30, FP)
    cache.put(tokens, 4, _seg(kv, 4, 10), state, None)
    cache.close()
    size = root.stat().st_size
    if damage == "flip data":
        _flip(root, size - 3)
    elif damage == "flip header":
        header = root.read_bytes()
        _flip(root, header.index(b'"start":"0"') + 9)  # start 0 -> 1: still JSON, still plausible
    elif damage == "truncate":
        os.truncate(root, size - 16)
    else:
        os.truncate(root, 5)

    cache = DiskCache(tmp_path, 1 << 30, FP)
    if cache.kv_covered(tokens):  # the damage is only found when the data is read
        assert cache.lookup(tokens[:-1] + [0]) == 0
        assert cache.lookup(tokens + [1]) == 10
        assert cache.load(tokens, 10) is None
    assert cache.kv_covered(tokens) == 0 and cache.lookup(tokens + [1]) == 0
    assert _files(tmp_path) == []  # the damaged root and the segment chaining through it
    assert cache.stats()["errors"] >= 1
    cache.close()


def test_another_models_file_is_removed(tmp_path):
    tokens = list(range(8))
    kv, state = _full(8, mx.float32), _state(mx.float32)
    theirs = DiskCache(tmp_path / "theirs", 1 << 30, "feedfacefeedface")
    theirs.put(tokens, 0, kv, state, None)
    theirs.close()
    ours = DiskCache(tmp_path / "ours", 1 << 30, FP)
    ours.put(tokens, 0, kv, state, None)
    ours.close()
    (their_file,), (our_file,) = _files(tmp_path / "theirs"), _files(tmp_path / "ours")
    our_file.unlink()
    os.replace(their_file, our_file)  # their file under exactly the name ours would look for

    ours = DiskCache(tmp_path / "ours", 1 << 30, FP)
    assert ours.kv_covered(tokens) == 0 and ours.lookup(tokens) == 0
    assert _files(tmp_path / "ours") == [] and ours.stats()["errors"] == 1
    ours.close()


def test_stays_under_its_size_least_recently_used_out_with_their_chains(tmp_path):
    kv, state = _full(8, mx.float32), _state(mx.float32)
    one = sum(a.nbytes for pair in _seg(kv, 0, 4) + state for a in pair)  # a 4-token segment with state
    a, b, c = list(range(8)), [9] + list(range(1, 8)), [10] + list(range(1, 8))
    cache = DiskCache(tmp_path, int(3.5 * one), FP)
    cache.put(a[:4], 0, _seg(kv, 0, 4), state, None)
    cache.put(a, 4, _seg(kv, 4, 8), state, None)
    cache.put(b[:4], 0, _seg(kv, 0, 4), state, None)
    assert cache.lookup(a + [0]) == 8  # a's chain used after b: b is now the least recent
    cache.put(c[:4], 0, _seg(kv, 0, 4), state, None)
    assert cache.kv_covered(b) == 0 and cache.kv_covered(a) == 8 and cache.kv_covered(c) == 4
    cache.put(c, 4, _seg(kv, 4, 8), state, None)  # room again: a's root goes, and a's segment chaining on it
    assert cache.kv_covered(a) == 0 and cache.kv_covered(c) == 8
    assert cache.stats()["evicted"] == 3
    cache.close()
    assert len(_files(tmp_path)) == 2
    assert sum(p.stat().st_size for p in _files(tmp_path)) <= cache.max_bytes
    assert cache.stats()["bytes"] == sum(p.stat().st_size for p in _files(tmp_path))
    assert cache.stats()["files"] == 2 and cache.stats()["queued"] == 0

    smaller = DiskCache(tmp_path, int(1.5 * one), FP)  # a restart with a smaller size evicts at once
    assert smaller.kv_covered(c) == 0 and _files(tmp_path) == []
    smaller.close()


def test_put_never_blocks_and_close_flushes(tmp_path, monkeypatch):
    real_write = DiskCache._write

    def slow_write(self, seg):
        time.sleep(0.3)
        real_write(self, seg)

    monkeypatch.setattr(DiskCache, "_write", slow_write)
    kv, state = _full(40, mx.bfloat16), _state(mx.bfloat16)
    tokens = list(range(40))
    cache = DiskCache(tmp_path, 1 << 30, FP)
    t0 = time.perf_counter()
    for end in range(8, 41, 8):
        cache.put(tokens[:end], end - 8, _seg(kv, end - 8, end), state, None)
    assert time.perf_counter() - t0 < 0.3  # five writes of 0.3 s each are still ahead
    assert cache.stats()["queued"] >= 4 and cache.kv_covered(tokens) == 40
    got = cache.load(tokens, 40)  # served from the queued arrays meanwhile
    assert _bytes(got[0][0][0]) == _bytes(kv[0][0])
    cache.close()
    assert len(_files(tmp_path)) == 5

    again = DiskCache(tmp_path, 1 << 30, FP)
    assert again.lookup(tokens + [0]) == 40
    assert _bytes(again.load(tokens, 40)[0][1][1]) == _bytes(kv[1][1])
    again.close()


def test_a_full_queue_drops_instead_of_waiting(tmp_path, monkeypatch):
    monkeypatch.setattr(DiskCache, "_write", lambda self, seg: time.sleep(0.5))
    kv, state = _full(8, mx.float32), _state(mx.float32)
    one = sum(a.nbytes for pair in _seg(kv, 0, 4) + state for a in pair)
    cache = DiskCache(tmp_path, 1 << 30, FP, max_queued_bytes=int(1.5 * one))
    t0 = time.perf_counter()
    for i in range(4):
        cache.put([i, 1, 2, 3], 0, _seg(kv, 0, 4), state, None)
    assert time.perf_counter() - t0 < 0.25
    assert cache.stats()["dropped"] == 3
    cache.close(timeout=0)


def test_puts_that_cannot_be_restored_are_ignored(tmp_path):
    kv, state = _full(8, mx.float32), _state(mx.float32)
    cache = DiskCache(tmp_path, 4096, FP)
    cache.put(list(range(8)), 4, _seg(kv, 4, 8), state, None)  # nothing ends at 4 along this path
    cache.put(list(range(8)), 0, kv, state, None)  # larger than the whole directory
    assert cache.kv_covered(list(range(8))) == 0 and cache.stats()["queued"] == 0
    cache.close()
    assert _files(tmp_path) == []


def test_leftovers_removed_and_other_files_left_alone(tmp_path):
    (tmp_path / f"{'a' * 32}.123.456.tmp").write_bytes(b"half a segment")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "model.safetensors").write_bytes(b"not ours to judge")
    DiskCache(tmp_path, 1 << 20, FP).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "notes.txt"]


def test_writes_while_the_engine_thread_evaluates(tmp_path):
    """The writer reads the buffers put handed it while this thread keeps MLX busy: no crash, identical bytes."""
    kv, state = _full(64, mx.bfloat16), _state(mx.bfloat16)
    tokens = list(range(64))
    cache = DiskCache(tmp_path, 1 << 30, FP)
    x = mx.random.normal((256, 256))
    for end in range(4, 65, 4):
        cache.put(tokens[:end], end - 4, _seg(kv, end - 4, end), state, None)
        for _ in range(5):
            x = mx.tanh(x @ x.T / 256)
            mx.eval(x)
    cache.close()
    again = DiskCache(tmp_path, 1 << 30, FP)
    got = again.load(tokens, 64)
    assert got is not None and all(_bytes(k2) == _bytes(k) and _bytes(v2) == _bytes(v)
                                   for (k, v), (k2, v2) in zip(kv, got[0]))
    again.close()


def test_metrics_show_the_disk_tier_only_when_the_engine_has_one(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics

    kv, state = _full(8, mx.float32), _state(mx.float32)
    cache = DiskCache(tmp_path, 1 << 30, FP)
    cache.put(list(range(8)), 0, kv, state, None)
    cache.lookup(list(range(8)) + [1])
    cache.lookup([5, 6])
    cache.close()

    class EngineStats:  # what EngineCore.stats() carries, as of its last step
        def __init__(self, stats):
            self._stats = stats

        def stats(self):
            return self._stats

    def scrape(stats):
        text = Metrics(EngineStats(stats)).render().decode()
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}

    got = scrape({"prefix_cache_disk": cache.stats()})
    size = _files(tmp_path)[0].stat().st_size
    assert got["deltaserve_prefix_cache_disk_hits_total"] == 1 and got["deltaserve_prefix_cache_disk_misses_total"] == 1
    assert got["deltaserve_prefix_cache_disk_bytes"] == size and got["deltaserve_prefix_cache_disk_files"] == 1
    assert got["deltaserve_prefix_cache_disk_written_bytes_total"] == size
    assert got["deltaserve_prefix_cache_disk_write_seconds_total"] > 0
    assert not any("prefix_cache_disk" in name for name in scrape({}))


def test_serve_flags_reach_the_engine_config(tmp_path):
    from server.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["serve", "--prefix-cache-dir", str(tmp_path / "kv"),
                                      "--prefix-cache-disk-size", "3G"])
    config = settings_from_args(args).engine_config()
    assert config.prefix_cache_dir == str(tmp_path / "kv") and config.prefix_cache_disk_bytes == 3 << 30
    default = settings_from_args(build_parser().parse_args(["serve", "--prefix-cache-dir", "x"])).engine_config()
    assert default.prefix_cache_disk_bytes == 32 << 30
    off = build_parser().parse_args(["serve", "--prefix-cache-dir", "x", "--no-enable-prefix-cache"])
    assert settings_from_args(off).engine_config().prefix_cache_dir is None


def test_an_unusable_cache_dir_is_a_clear_error_before_loading(tmp_path, capsys):
    from server.cli import main

    (tmp_path / "file").write_text("")
    assert main(["serve", "--prefix-cache-dir", str(tmp_path / "file" / "kv")]) == 2
    err = capsys.readouterr().err
    assert f"--prefix-cache-dir {tmp_path / 'file' / 'kv'}: not a writable directory" in err
    assert "Traceback" not in err and "loading" not in err
    assert main(["serve", "--prefix-cache-dir", str(tmp_path), "--prefix-cache-disk-size", "0"]) == 2
    assert "prefix_cache_disk_bytes must be at least 1" in capsys.readouterr().err


def test_a_failed_write_leaves_nothing_and_is_counted(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(b"x")
            raise OSError(28, "No space left on device")

    def open_(path, mode="r", *args, **kw):
        f = real_open(path, mode, *args, **kw)
        return FullDisk(f) if str(path).endswith(".tmp") else f

    kv, state = _full(8, mx.float32), _state(mx.float32)
    cache = DiskCache(tmp_path, 1 << 30, FP)
    monkeypatch.setattr(builtins, "open", open_)
    cache.put(list(range(8)), 0, kv, state, None)
    cache.close()
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    assert cache.stats()["errors"] == 1 and cache.kv_covered(list(range(8))) == 0
