"""Hugging Face Qwen3.5 checkpoint -> GGUF, laid out exactly as llama.cpp's convert_hf_to_gguf.py lays
out `qwen35moe` / `qwen35` (as vendored in llama-cpp-python 0.3.36; with --no-mtp unless mtp=True).

Same metadata keys, value types and key order; same tensor names, order, shapes, types and bytes.
The forward transforms llama.cpp applies (REFERENCE.md section 3, the ones gguf_inverse undoes):

  A_log -> ssm_a = -exp(A_log)          norms (not linear_attn.norm) -> w + 1
  conv1d [C, 1, K] -> [C, K]            V heads grouped (j*r + v) -> tiled (v*Hk + j), when Hk != Hv
  experts.gate_up_proj -> gate, up      per-expert tensors -> stacked [E, ...]

1-D tensors, norms, routers (ffn_gate_inp, ffn_gate_inp_shexp), ssm_conv1d, ssm_a and ssm_dt stay
F32; everything else takes the output type (BF16 or F32). MTP tensors are dropped (--no-mtp), or with
mtp=True kept as llama.cpp keeps them: block n_layers + i is mtp.layers.i, and fc, pre_fc_norm_embedding,
pre_fc_norm_hidden and norm are that block's nextn.eh_proj, enorm, hnorm and shared_head_norm (norms + 1);
block_count counts those blocks and {arch}.nextn_predict_layers says how many.
Where we differ: general.name is given (llama.cpp derives it from the directory name or model card),
and tokenizer.ggml.pre is given (llama.cpp hashes a test tokenisation against its table of known
vocabularies, which a vocabulary of our own is not in); other general.* keys from model cards are
not written.

CLI: python -m convert.gguf_writer HF_DIR OUT.gguf [--name NAME] [--outtype bf16|f32] [--pre qwen35] [--mtp]
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

ARCHS = {"Qwen3_5MoeForCausalLM": "qwen35moe", "Qwen3_5MoeForConditionalGeneration": "qwen35moe",
         "Qwen3_5ForCausalLM": "qwen35", "Qwen3_5ForConditionalGeneration": "qwen35"}
DEFAULT_MROPE_SECTION = [11, 11, 10, 0]  # llama.cpp writes it when a checkpoint has none
FILE_TYPES = {"f32": 0, "bf16": 32}  # LlamaFileType.ALL_F32, MOSTLY_BF16
GGML_QUANT_VERSION = 2

TOP_LEVEL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
# suffix after model.layers.N. -> GGUF name after blk.N.
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
    "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
    "mlp.experts.gate_proj.weight": "ffn_gate_exps.weight",
    "mlp.experts.up_proj.weight": "ffn_up_exps.weight",
    "mlp.experts.down_proj.weight": "ffn_down_exps.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
# GGUF names kept in F32 whatever the output type (besides 1-D tensors and *_norm.weight)
F32_NAMES = re.compile(r"\.(ffn_gate_inp|ffn_gate_inp_shexp|ssm_conv1d)\.weight$")
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_TOP = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
            "norm": "shared_head_norm"}  # conversion/qwen.py's remapper (shared_head.norm -> shared_head_norm)


def _neg_exp(x: np.ndarray) -> np.ndarray:
    """-exp(x) in float32, computed the way llama.cpp's converter computes ssm_a (torch, float32) when
    torch is installed: torch's vectorised exp is not correctly rounded, and which values it rounds the
    other way depends on the CPU, so only the same arithmetic gives the same bits. Without torch,
    correctly rounded (through float64): at most one unit in the last place from llama.cpp's."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    try:
        import torch
    except ImportError:
        return -np.exp(x.astype(np.float64)).astype(np.float32)
    return (-torch.exp(torch.from_numpy(x))).numpy()


class GGUFWriteError(ValueError):
    """The checkpoint cannot be written as a qwen35 / qwen35moe GGUF; the message says why."""


# ---------------------------------------------------------------- reading the checkpoint

def _safetensors_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [hf_dir / n for n in names]
    files = sorted(hf_dir.glob("model*.safetensors"))
    if not files:
        raise GGUFWriteError(f"{hf_dir}: no model*.safetensors files")
    return files


def iter_safetensors(hf_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) in llama.cpp's order: files sorted by name, tensors sorted by name."""
    for path in _safetensors_files(Path(hf_dir)):
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            start = 8 + header_len
        header.pop("__metadata__", None)
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        for name in sorted(header):
            meta = header[name]
            lo, hi = meta["data_offsets"]
            buf = raw[start + lo:start + hi]
            if meta["dtype"] == "BF16":
                data = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
            elif meta["dtype"] == "F32":
                data = buf.view(np.float32).copy()
            else:
                raise GGUFWriteError(f"{path.name}: tensor {name} is {meta['dtype']}; only BF16 and F32 are supported")
            yield name, data.reshape(meta["shape"])


# ---------------------------------------------------------------- tensor transforms

def _grouped_to_tiled(x: np.ndarray, axis: int, k_heads: int, r: int, head_dim: int) -> np.ndarray:
    """V heads along `axis` from HF's grouped order (k head j owns j*r .. j*r+r-1) to ggml's tiled order."""
    shape = list(x.shape)
    axis %= x.ndim
    x = x.reshape(shape[:axis] + [k_heads, r, head_dim] + shape[axis + 1:])
    return np.ascontiguousarray(np.swapaxes(x, axis, axis + 1)).reshape(shape)


def mtp_layers(hp: dict) -> int:
    """The MTP layers llama.cpp writes when it keeps them: config.json's count (Qwen3.5 carries it)."""
    return int(hp.get("mtp_num_hidden_layers") or 0)


class _Converter:
    def __init__(self, hp: dict, mtp: bool = False):
        self.hp = hp
        self.mtp = mtp
        self.k_heads = hp.get("linear_num_key_heads", 0)
        self.v_heads = hp.get("linear_num_value_heads", 0)
        self.n_experts = hp.get("num_experts") or 0
        self.pending: dict[int, dict[str, np.ndarray]] = {}

    def _reorder_v(self, name: str, x: np.ndarray) -> np.ndarray:
        hk, hv = self.k_heads, self.v_heads
        if not (hk and hv and hk != hv and ".linear_attn." in name):
            return x
        r, dk, dv = hv // hk, self.hp["linear_key_head_dim"], self.hp["linear_value_head_dim"]
        if ".in_proj_qkv." in name:
            qk = 2 * hk * dk
            return np.concatenate([x[:qk], _grouped_to_tiled(x[qk:], 0, hk, r, dv)], axis=0)
        if ".in_proj_z." in name:
            return _grouped_to_tiled(x, 0, hk, r, dv)
        if ".in_proj_a." in name or ".in_proj_b." in name:
            return _grouped_to_tiled(x, 0, hk, r, 1)
        if name.endswith((".A_log", ".dt_bias")):
            return _grouped_to_tiled(x[:, None], 0, hk, r, 1)[:, 0] if x.ndim == 1 else _grouped_to_tiled(x, -1, hk, r, 1)
        if ".conv1d" in name:
            x = np.squeeze(x)
            qk = 2 * hk * dk
            return np.concatenate([x[:qk], _grouped_to_tiled(x[qk:], 0, hk, r, dv)], axis=0)
        if ".out_proj." in name:
            return _grouped_to_tiled(x, 1, hk, r, dv)
        return x

    def tensors(self, name: str, x: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """GGUF (name, data) pairs for one checkpoint tensor: none, one or several."""
        if any(s in name for s in ("visual.", "vision", "audio")):
            return
        if name.startswith(("mtp.", "model.mtp.")):
            if not self.mtp:
                return
            name = self._mtp_name(name.removeprefix("model."))
        name = name.replace("language_model.", "")
        x = self._reorder_v(name, x)
        if name.endswith(".A_log"):
            x = _neg_exp(x)
        elif "conv1d" in name:
            x = np.squeeze(x)
        elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            x = x + np.float32(1)
        if name in TOP_LEVEL:
            yield TOP_LEVEL[name], x
            return
        if name.startswith("nextn."):
            bid, rest = name.removeprefix("nextn.").split(".", 1)
            yield f"blk.{bid}.nextn.{rest}", x
            return
        m = _LAYER_NAME.match(name)
        if not m:
            raise GGUFWriteError(f"cannot map tensor {name!r}")
        bid, rest = int(m[1]), m[2]
        if rest == "mlp.experts.gate_up_proj":
            if x.ndim != 3 or x.shape[1] % 2:
                raise GGUFWriteError(f"{name}: unexpected shape {x.shape}")
            n_ff = x.shape[1] // 2
            yield f"blk.{bid}.ffn_gate_exps.weight", np.ascontiguousarray(x[:, :n_ff])
            yield f"blk.{bid}.ffn_up_exps.weight", np.ascontiguousarray(x[:, n_ff:])
            return
        if e := _EXPERT.match(rest):
            bucket = self.pending.setdefault(bid, {})
            bucket[f"{e[1]}.{e[2]}"] = x
            if len(bucket) == 3 * self.n_experts:
                for proj in ("down_proj", "gate_proj", "up_proj"):
                    stacked = np.stack([bucket.pop(f"{i}.{proj}") for i in range(self.n_experts)])
                    yield f"blk.{bid}.{LAYER[f'mlp.experts.{proj}.weight']}", stacked
            return
        if rest not in LAYER:
            raise GGUFWriteError(f"cannot map tensor {name!r}")
        yield f"blk.{bid}.{LAYER[rest]}", x

    def _mtp_name(self, name: str) -> str:
        """mtp.* -> a name in block n_layers (+ i): model.layers.N.* for the decoder layer, nextn.N.* else."""
        n = self.hp["num_hidden_layers"]
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[1] == "layers" and parts[2].isdecimal():
            return f"model.layers.{n + int(parts[2])}.{parts[3]}"
        if len(parts) == 3 and parts[1] in _MTP_TOP:
            return f"nextn.{n}.{_MTP_TOP[parts[1]]}.{parts[2]}"
        raise GGUFWriteError(f"cannot map MTP tensor {name!r}")

    def finish(self) -> None:
        left = [k for d in self.pending.values() for k in d]
        if left:
            raise GGUFWriteError(f"incomplete per-expert tensors: {left[:4]}")


def _qtype(gguf_name: str, ndim: int, outtype: str):
    if ndim <= 1 or gguf_name.endswith("_norm.weight") or F32_NAMES.search(gguf_name) \
            or not gguf_name.endswith(".weight") or outtype == "f32":
        return gguf.GGMLQuantizationType.F32
    return gguf.GGMLQuantizationType.BF16


# ---------------------------------------------------------------- metadata

def _hparams(hf_dir: Path) -> tuple[str, dict]:
    config = json.loads((hf_dir / "config.json").read_text())
    archs = config.get("architectures") or []
    if not archs or archs[0] not in ARCHS:
        raise GGUFWriteError(f"{hf_dir}/config.json: architectures {archs} is not one of {sorted(ARCHS)}")
    hp = {**config, **config.get("text_config", {})}
    rope = dict(hp.get("rope_parameters") or hp.get("rope_scaling") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key not in rope and hp.get(key) is not None:
            rope[key] = hp[key]
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise GGUFWriteError(f"rope type {rope.get('rope_type')!r} is not supported (only 'default')")
    hp["rope_parameters"] = rope
    return ARCHS[archs[0]], hp


def _add_model_keys(w, arch: str, hp: dict, outtype: str, n_mtp: int = 0) -> None:
    """The keys llama.cpp's Qwen3.5 classes write, in their order (TextModel, Qwen2Moe, MTP mixin, Qwen3Next,
    mrope mixin); n_mtp MTP blocks follow the trunk's."""
    k = f"{arch}."
    rope = hp["rope_parameters"]
    w.add_uint32(k + "block_count", hp["num_hidden_layers"] + n_mtp)
    if hp.get("max_position_embeddings") is not None:
        w.add_uint32(k + "context_length", hp["max_position_embeddings"])
    w.add_uint32(k + "embedding_length", hp["hidden_size"])
    if hp.get("intermediate_size") is not None:
        w.add_uint32(k + "feed_forward_length", hp["intermediate_size"])
    w.add_uint32(k + "attention.head_count", hp["num_attention_heads"])
    if hp.get("num_key_value_heads") is not None:
        w.add_uint32(k + "attention.head_count_kv", hp["num_key_value_heads"])
    if "mrope_section" in rope:
        sections = list(rope["mrope_section"])
        w.add_array(k + "rope.dimension_sections", (sections + [0] * 4)[:4])
    if rope.get("rope_theta") is not None:
        w.add_float32(k + "rope.freq_base", rope["rope_theta"])
    if hp.get("rms_norm_eps") is not None:
        w.add_float32(k + "attention.layer_norm_rms_epsilon", hp["rms_norm_eps"])
    if hp.get("num_experts") is not None:
        w.add_uint32(k + "expert_count", hp["num_experts"])
    if hp.get("num_experts_per_tok") is not None:
        w.add_uint32(k + "expert_used_count", hp["num_experts_per_tok"])
    if hp.get("head_dim") is not None:
        w.add_uint32(k + "attention.key_length", hp["head_dim"])
        w.add_uint32(k + "attention.value_length", hp["head_dim"])
    w.add_uint32("general.file_type", FILE_TYPES[outtype])
    if hp.get("moe_intermediate_size") is not None:
        w.add_uint32(k + "expert_feed_forward_length", hp["moe_intermediate_size"])
    if hp.get("shared_expert_intermediate_size") is not None:
        w.add_uint32(k + "expert_shared_feed_forward_length", hp["shared_expert_intermediate_size"])
    if n_mtp:
        w.add_uint32(k + "nextn_predict_layers", n_mtp)
    w.add_uint32(k + "ssm.conv_kernel", hp["linear_conv_kernel_dim"])
    w.add_uint32(k + "ssm.state_size", hp["linear_key_head_dim"])
    w.add_uint32(k + "ssm.group_count", hp["linear_num_key_heads"])
    w.add_uint32(k + "ssm.time_step_rank", hp["linear_num_value_heads"])
    w.add_uint32(k + "ssm.inner_size", hp["linear_value_head_dim"] * hp["linear_num_value_heads"])
    if (layer_types := hp.get("layer_types")) is not None:
        if len(layer_types) != hp["num_hidden_layers"]:
            raise GGUFWriteError(f"layer_types has {len(layer_types)} entries, expected {hp['num_hidden_layers']}")
        w.add_array(k + "attention.recurrent_layers", [t == "linear_attention" for t in layer_types] + [False] * n_mtp)
    w.add_uint32(k + "full_attention_interval", hp.get("full_attention_interval", 4))
    head_dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    w.add_uint32(k + "rope.dimension_count", int(head_dim * rope.get("partial_rotary_factor", 0.25)))
    if "mrope_section" not in rope:
        w.add_array(k + "rope.dimension_sections", DEFAULT_MROPE_SECTION)


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>")) \
        or token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<unused") and token.endswith(">"))


SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")


def _add_tokenizer_keys(w, hf_dir: Path, hp: dict, pre: str) -> None:
    """A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's gpt2 vocabulary."""
    tj = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tc_path = hf_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFWriteError(f"{hf_dir}/tokenizer.json: a {model.get('type')} model, not BPE")
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    reverse = {i: t for t, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    n_vocab = hp.get("vocab_size", len(reverse))
    if max(reverse) >= n_vocab:
        raise GGUFWriteError(f"token id {max(reverse)} is outside the model's vocabulary of {n_vocab}")
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            special = added[i].get("special") or _looks_special(reverse[i])
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", pre)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [int(t) for t in types])

    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):
        merges = [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                  for pair in merges]
    if merges:
        w.add_array("tokenizer.ggml.merges", list(merges))

    # special ids: tokenizer_config's *_token strings first, then config.json's *_token_id
    add_flags = {}
    post = tj.get("post_processor") or {}
    for proc in post.get("processors", [post]) if post else []:
        if proc.get("type") == "ByteLevel":
            add_flags.setdefault("bos", False)
            add_flags.setdefault("eos", False)
        elif proc.get("type") == "TemplateProcessing":
            single = proc.get("single", [])
            if len(single) > 1 or any("SpecialToken" in p for p in proc.get("pair", [])):
                raise GGUFWriteError("a TemplateProcessing post-processor that adds special tokens is not supported")
        elif proc.get("type") not in (None,):
            raise GGUFWriteError(f"post-processor {proc.get('type')!r} is not supported")
    ids: dict[str, int] = {}
    by_content = {t["content"]: i for i, t in sorted(added.items())}
    for typ in SPECIAL_TYPES:
        if isinstance(flag := tc.get(f"add_{typ}_token"), bool):
            add_flags.setdefault(typ, flag)
        entry = tc.get(f"{typ}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str) and content in by_content and typ not in ids:
            ids[typ] = by_content[content]
    config = json.loads((hf_dir / "config.json").read_text())
    for typ in SPECIAL_TYPES:
        tid = config.get(f"{typ}_token_id", config.get("text_config", {}).get(f"{typ}_token_id"))
        if isinstance(tid, int) and 0 <= tid < n_vocab and typ not in ids:
            ids[typ] = tid
    for typ, tid in ids.items():
        w.add_uint32(f"tokenizer.ggml.{typ}_token_id" if typ != "pad" else "tokenizer.ggml.padding_token_id", tid)
    for typ, flag in add_flags.items():
        w.add_bool(f"tokenizer.ggml.add_{typ}_token", flag)

    template = tc.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None:
        w.add_string("tokenizer.chat_template", template)


# ---------------------------------------------------------------- the file

def write_gguf(hf_dir, out_path, *, name: str | None = None, outtype: str = "bf16", tokenizer_pre: str = "qwen35",
               mtp: bool = False) -> Path:
    """Write `hf_dir` (a Qwen3.5 / Qwen3.5-MoE HF checkpoint with tokenizer.json) as one GGUF file; with
    `mtp`, its MTP layers too (config.json's mtp_num_hidden_layers of them)."""
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in FILE_TYPES:
        raise GGUFWriteError(f"outtype must be one of {sorted(FILE_TYPES)}, not {outtype!r}")
    arch, hp = _hparams(hf_dir)
    w = gguf.GGUFWriter(path=None, arch=arch)
    n_mtp = mtp_layers(hp) if mtp else 0
    if mtp and not n_mtp:
        raise GGUFWriteError(f"{hf_dir}/config.json declares no MTP layers (mtp_num_hidden_layers)")
    conv = _Converter(hp, mtp)
    for hf_name, data in iter_safetensors(hf_dir):
        for gguf_name, x in conv.tensors(hf_name, data):
            qtype = _qtype(gguf_name, x.ndim, outtype)
            x = np.ascontiguousarray(x, dtype=np.float32)
            w.add_tensor(gguf_name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    conv.finish()

    total, shared, expert, n_experts = w.get_total_parameter_count()
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or hf_dir.name)
    if total > 0:
        w.add_size_label(gguf.size_label(total, shared, expert, n_experts))
    _add_model_keys(w, arch, hp, outtype, n_mtp)
    w.add_uint32("general.quantization_version", GGML_QUANT_VERSION)
    _add_tokenizer_keys(w, hf_dir, hp, tokenizer_pre)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file(path=out_path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Write a Qwen3.5 HF checkpoint as a GGUF laid out like llama.cpp's.")
    p.add_argument("hf_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--name", help="general.name (default: the directory name)")
    p.add_argument("--outtype", default="bf16", choices=sorted(FILE_TYPES))
    p.add_argument("--pre", default="qwen35", help="tokenizer.ggml.pre (default qwen35)")
    p.add_argument("--mtp", action="store_true", help="keep the MTP layers (as llama.cpp without --no-mtp)")
    args = p.parse_args(argv)
    write_gguf(args.hf_dir, args.out, name=args.name, outtype=args.outtype, tokenizer_pre=args.pre, mtp=args.mtp)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
