"""Peak resident memory and throughput of `convert` on a synthetic qwen35moe BF16 GGUF whose largest
tensor (an expert stack) is >= 1 GB. Each mode runs in a fresh process; peak RSS is that process's
high-water mark (mapped file pages included).

    python -m bench.convert_memory                      # cast, quantize, imatrix modes
    python -m bench.convert_memory --layers 4 --modes quantize

Reports peak RSS / largest tensor (target <= 3), the same after subtracting the process's RSS before
converting (interpreter and libraries), and source MB/s. The vocabulary (and the tokenizer metadata)
comes from llama.cpp's ggml-vocab-qwen35.gguf, via the test fixtures.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench" / "convert_memory"
MODES = {
    "cast": dict(dtype="bfloat16"),
    "quantize": dict(quantize=True, q_recipe="unsloth"),
    "imatrix": dict(quantize=True, q_recipe="unsloth", awq_alpha="auto"),
}


def _vocab_fields() -> dict:
    import gguf
    from fixtures.llamacpp import vocab_gguf_path

    from convert.gguf_reader import GGUFFile

    g = GGUFFile(vocab_gguf_path())
    try:
        fields = {}
        for key, (vtype, pos) in g.header.raw_fields.items():
            if key.startswith("tokenizer."):
                sub = None
                if vtype == gguf.GGUFValueType.ARRAY:
                    sub = gguf.GGUFValueType(int.from_bytes(g.header.mm[pos:pos + 4], "little"))
                fields[key] = (g.get(key), gguf.GGUFValueType(vtype), sub)
        return fields
    finally:
        g.close()


def shapes(a) -> dict[str, tuple[int, ...]]:
    """numpy shapes of every tensor, in llama.cpp's names."""
    H, E, I, S = a.hidden, a.experts, a.moe, a.shared
    hk, hv, d = 16, 32, 128
    qkv = 2 * hk * d + hv * d
    out = {"token_embd.weight": (a.vocab, H), "output_norm.weight": (H,), "output.weight": (a.vocab, H)}
    for n in range(a.layers):
        b = f"blk.{n}."
        out.update({b + "attn_norm.weight": (H,), b + "post_attention_norm.weight": (H,),
                    b + "ffn_gate_inp.weight": (E, H), b + "ffn_gate_exps.weight": (E, I, H),
                    b + "ffn_up_exps.weight": (E, I, H), b + "ffn_down_exps.weight": (E, H, I),
                    b + "ffn_gate_inp_shexp.weight": (H,), b + "ffn_gate_shexp.weight": (S, H),
                    b + "ffn_up_shexp.weight": (S, H), b + "ffn_down_shexp.weight": (H, S)})
        if (n + 1) % 2:
            out.update({b + "attn_qkv.weight": (qkv, H), b + "attn_gate.weight": (hv * d, H),
                        b + "ssm_beta.weight": (hv, H), b + "ssm_alpha.weight": (hv, H),
                        b + "ssm_conv1d.weight": (qkv, 4), b + "ssm_dt.bias": (hv,), b + "ssm_a": (hv,),
                        b + "ssm_norm.weight": (d,), b + "ssm_out.weight": (H, hv * d)})
        else:
            out.update({b + "attn_q.weight": (16 * 256 * 2, H), b + "attn_k.weight": (2 * 256, H),
                        b + "attn_v.weight": (2 * 256, H), b + "attn_output.weight": (H, 16 * 256),
                        b + "attn_q_norm.weight": (256,), b + "attn_k_norm.weight": (256,)})
    return out


def _bf16(rng, shape, scale=0.02) -> np.ndarray:
    out = np.empty(shape, np.uint16)
    flat = out.reshape(shape[0], -1)
    for i in range(shape[0]):  # row blocks: no float32 copy of the whole tensor
        x = rng.standard_normal(flat.shape[1], dtype=np.float32) * np.float32(scale)
        flat[i] = (x.view(np.uint32) >> 16).astype(np.uint16)
    return out


def build_gguf(a, path: Path) -> Path:
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="qwen35moe")
    arch = "qwen35moe"
    ints = {"block_count": a.layers, "context_length": 4096, "embedding_length": a.hidden,
            "attention.head_count": 16, "attention.head_count_kv": 2, "attention.key_length": 256,
            "attention.value_length": 256, "expert_count": a.experts, "expert_used_count": 8,
            "expert_feed_forward_length": a.moe, "expert_shared_feed_forward_length": a.shared,
            "ssm.conv_kernel": 4, "ssm.state_size": 128, "ssm.group_count": 16, "ssm.time_step_rank": 32,
            "ssm.inner_size": 32 * 128, "full_attention_interval": 2, "rope.dimension_count": 64}
    for k, v in ints.items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.rope.freq_base", 1e7)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_array(f"{arch}.rope.dimension_sections", [11, 11, 10, 0])
    w.add_array(f"{arch}.attention.recurrent_layers", [bool((n + 1) % 2) for n in range(a.layers)])
    for key, (value, vtype, sub) in _vocab_fields().items():
        w.add_key_value(key, value, vtype, sub)
    table = shapes(a)
    for name, shape in table.items():
        small = len(shape) == 1 or name.endswith(("ssm_conv1d.weight", "ffn_gate_inp.weight"))
        dtype = np.float32 if small else np.uint16
        raw = gguf.GGMLQuantizationType.F32 if small else gguf.GGMLQuantizationType.BF16
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        w.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in table.items():
        if len(shape) == 1:
            x = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            if name.endswith("ssm_a"):
                x = -np.abs(x)
        elif name.endswith(("ssm_conv1d.weight", "ffn_gate_inp.weight")):
            x = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            x = _bf16(rng, shape)
        w.write_tensor_data(x)
        del x
    w.close()
    return path


def synthetic_imatrix(a, path: Path) -> Path:
    from convert.imatrix import Entry, write_gguf

    rng = np.random.default_rng(1)
    entries = {}
    for name, shape in shapes(a).items():
        if len(shape) >= 2 and "conv1d" not in name and not name.startswith(("token_embd", "output")):
            n_mat = shape[0] if len(shape) == 3 else 1
            counts = rng.integers(100, 1000, n_mat).astype(np.float64)
            entries[name] = Entry(10 ** rng.uniform(-1, 1, (n_mat, shape[-1])) * counts[:, None], counts)
    write_gguf(path, entries)
    return path


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_one(args) -> None:
    """In the child: convert once, print a JSON line."""
    import model  # noqa: F401  (OpenBLAS before mlx on Linux)
    from convert import convert

    options = dict(MODES[args.run])
    if args.run == "imatrix":
        options["imatrix_path"] = args.imatrix
    base = _rss_now()
    t0 = time.perf_counter()
    convert(args.gguf, args.out, progress=False, overwrite=True, **options)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "base": base, "seconds": seconds}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--moe", type=int, default=2048, help="expert intermediate size")
    ap.add_argument("--shared", type=int, default=512)
    ap.add_argument("--modes", default="cast,quantize,imatrix")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic GGUF under .cache/bench")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--imatrix", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.run:
        run_one(a)
        return 0
    a.vocab = 151936
    table = shapes(a)
    largest = max(int(np.prod(s)) * (4 if len(s) == 1 else 2) for s in table.values())
    total = sum(int(np.prod(s)) * 2 for s in table.values())
    key = f"L{a.layers}-H{a.hidden}-E{a.experts}-I{a.moe}"
    CACHE.mkdir(parents=True, exist_ok=True)
    gguf_path = CACHE / f"synthetic-{key}.gguf"
    if not gguf_path.exists():
        print(f"building {gguf_path.name}: {total / 1e9:.2f} GB, largest tensor {largest / 1e9:.2f} GB", flush=True)
        build_gguf(a, gguf_path.with_suffix(".tmp"))
        gguf_path.with_suffix(".tmp").rename(gguf_path)
    imatrix = synthetic_imatrix(a, CACHE / f"synthetic-{key}.imatrix.gguf")
    print(f"source {gguf_path.stat().st_size / 1e9:.2f} GB, largest tensor {largest / 1e9:.3f} GB "
          f"({a.layers} layers, {a.experts} experts of {a.moe}x{a.hidden})")
    print(f"{'mode':10s} {'peak RSS':>10s} {'peak/largest':>13s} {'(peak-base)/largest':>20s} {'MB/s':>8s} {'s':>7s}")
    with tempfile.TemporaryDirectory(prefix="convert-memory-", dir=CACHE) as tmp:
        for mode in a.modes.split(","):
            out = Path(tmp) / mode
            cmd = [sys.executable, "-m", "bench.convert_memory", "--run", mode, "--gguf", str(gguf_path),
                   "--out", str(out), "--imatrix", str(imatrix)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if done.returncode:
                print(done.stderr[-3000:])
                return 1
            r = json.loads(done.stdout.strip().splitlines()[-1])
            mbs = gguf_path.stat().st_size / 1e6 / r["seconds"]
            print(f"{mode:10s} {r['peak'] / 1e9:8.2f}GB {r['peak'] / largest:13.2f} "
                  f"{(r['peak'] - r['base']) / largest:20.2f} {mbs:8.1f} {r['seconds']:7.1f}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    if not a.keep:
        gguf_path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
