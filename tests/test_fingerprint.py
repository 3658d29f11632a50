"""model.fingerprint: equal for the same files wherever they lie; different when anything that
changes the state a model makes does (tensor data, dtype, quantisation, compute dtype); named by
differences(); cheap on a large checkpoint."""

import json
import shutil
import struct
import time

import mlx.core as mx
import pytest

from fixtures import get_fixture
from model.fingerprint import differences, fingerprint, identity


@pytest.fixture
def ckpt(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(get_fixture("dense_r2_tied").hf_dir, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))


def _first_tensor_offset(shard):
    # the safetensors layout from its spec: u64 header length, JSON header, data
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return 8 + n + header[name]["data_offsets"][0]


def test_same_files_elsewhere_same_fingerprint(ckpt, tmp_path):
    other = shutil.copytree(ckpt, tmp_path / "elsewhere")
    _edit_config(other, transformers_version="9.9.9")  # how the file was written, not what the model is
    assert identity(ckpt, "bfloat16") == identity(other, "bfloat16")
    assert fingerprint(identity(ckpt, "bfloat16")) == fingerprint(identity(other, "bfloat16"))


def test_data_change_in_place_changes_weights(ckpt):
    before = identity(ckpt, "float32")
    shard = ckpt / "model.safetensors"
    at = _first_tensor_offset(shard)
    with open(shard, "r+b") as f:  # same header, same size: only one byte of one tensor differs
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))
    after = identity(ckpt, "float32")
    assert after["weights"] != before["weights"]
    assert {k for k in before if before[k] != after[k]} == {"weights"}
    assert differences(before, after) == [f"weights: {before['weights'][:8]}… vs {after['weights'][:8]}…"]


def test_dtype_quantisation_and_compute_dtype_each_named(ckpt):
    base = identity(ckpt, "float32")
    assert differences(base, identity(ckpt, mx.bfloat16)) == ["compute_dtype: float32 vs bfloat16"]

    _edit_config(ckpt, quantization={"group_size": 64, "bits": 4})
    q4 = identity(ckpt, "float32")
    _edit_config(ckpt, quantization={"group_size": 64, "bits": 8})
    q8 = identity(ckpt, "float32")
    assert [line.split(":")[0] for line in differences(base, q4)] == ["quantization"]
    assert q4["quantization"] != q8["quantization"]

    shard = ckpt / "model.safetensors"
    tensors = mx.load(str(shard))
    mx.save_safetensors(str(shard), {k: v.astype(mx.float16) if v.dtype == mx.float32 else v.astype(mx.float32)
                                     for k, v in tensors.items()})
    assert identity(ckpt, "float32")["weights"] != q8["weights"]
    assert fingerprint(identity(ckpt, "float32")) != fingerprint(q8)


def test_cheap_on_a_large_sparse_checkpoint(tmp_path):
    # 64 tensors of 256 MiB each in a sparse file: 16 GiB that identity() must not read
    n, size = 64, 256 << 20
    header = {f"t{i}": {"dtype": "BF16", "shape": [size // 2], "data_offsets": [i * size, (i + 1) * size]}
              for i in range(n)}
    raw = json.dumps(header).encode()
    path = tmp_path / "big"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + n * size)
    t0 = time.perf_counter()
    ident = identity(path, "bfloat16")
    assert time.perf_counter() - t0 < 1.0
    assert len(fingerprint(ident)) == 16


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "config.json").unlink(), "cannot read config.json"),
    (lambda p: (p / "config.json").write_text("{"), "not JSON"),
    (lambda p: (p / "model.safetensors").write_bytes(b"\xff" * 16), "not a safetensors file"),
    (lambda p: (p / "model.safetensors").unlink(), "no *.safetensors weight files"),
])
def test_bad_checkpoint_is_a_clear_error(ckpt, breakage, message):
    breakage(ckpt)
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace(".", r"\.")):
        identity(ckpt, "float32")
