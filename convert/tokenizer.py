"""Tokenizer files for the output: rebuilt from GGUF metadata, or copied from HF.

A GGUF carries its tokenizer as tokenizer.* metadata. We read it with our own header parser and hand
it to transformers' GGUF tokenizer builder and Qwen3.5 tokenizer class, the pieces
`AutoTokenizer.from_pretrained(gguf_file=...)` uses, without its GGUF reader, which needs torch."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

from .errors import ConvertError
from .gguf_reader import ARCHITECTURES, open_header
from .hf_reader import TOKENIZER_FILES

SPECIAL = ("<|im_end|>", "<|endoftext|>")
# tokenizer_config's special tokens, from the metadata key holding each one's id
_SPECIAL_TOKEN_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                       "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}
_MEMO: OrderedDict = OrderedDict()  # tokenizer metadata digest -> (files, special ids): building is slow
_MEMO_SIZE = 4


def _special_ids(tok) -> dict:
    ids = {}
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tok, attr, None)
        if value is not None:
            ids[attr] = int(value)
    vocab = tok.get_vocab()
    eos = [ids["eos_token_id"]] if "eos_token_id" in ids else []
    eos += [vocab[t] for t in SPECIAL if t in vocab and vocab[t] not in eos]
    ids["eos_token_ids"] = eos
    return ids


def write_gguf_tokenizer(gguf_path: Path, out: Path, key: str | None = None) -> dict:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja from the GGUF's tokenizer.* metadata
    (tokens, merges, token types, pre-tokenizer, special tokens, chat template). `key` identifies
    that metadata (a digest): the same vocabulary is built once per process."""
    key = key or str(gguf_path.resolve())
    if key not in _MEMO:
        _MEMO[key] = _build_gguf_tokenizer(gguf_path)
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    files, special = _MEMO[key]
    for name, data in files.items():
        (out / name).write_bytes(data)
    return dict(special)


def _build_gguf_tokenizer(gguf_path: Path) -> tuple[dict, dict]:
    import tempfile

    from transformers import Qwen3_5Tokenizer  # what AutoTokenizer picks for qwen3_5 and qwen3_5_moe
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    from transformers.utils import logging as hf_logging

    architecture, tokenizer_dict, tokenizer_config = _read_metadata(gguf_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        tok = Qwen3_5Tokenizer(tokenizer_object=backend, **tokenizer_config, **extra)
    except Exception as e:  # transformers raises many types for metadata it cannot use
        raise ConvertError(f"{gguf_path}: cannot build a tokenizer from its metadata ({type(e).__name__}: {e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir())}
    return files, _special_ids(tok)


def _read_metadata(gguf_path: Path) -> tuple[str, dict, dict]:
    """(architecture, tokenizer fields, tokenizer_config fields) under transformers' names, as its
    get_gguf_tokenizer gives them."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING

    f, mm, head = open_header(gguf_path)
    try:
        architecture = head.value("general.architecture")
        groups = {group: {name: head.value(f"tokenizer.{key}") for key, name in renames.items()
                          if f"tokenizer.{key}" in head.raw_fields}
                  for group, renames in GGUF_TOKENIZER_MAPPING.items()}
        ids = {name: head.value(f"tokenizer.ggml.{key}") for name, key in _SPECIAL_TOKEN_KEYS.items()}
    finally:
        mm.close()
        f.close()
    if architecture not in ARCHITECTURES:
        raise ConvertError(f"{gguf_path}: unsupported architecture {architecture!r}; "
                           f"supported: {', '.join(ARCHITECTURES)}")
    tokenizer, config = groups["tokenizer"], groups["tokenizer_config"]
    tokens = tokenizer.get("tokens")
    if not tokens:
        raise ConvertError(f"{gguf_path}: no tokenizer.ggml.tokens in its metadata")
    for name, token_id in ids.items():
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise ConvertError(f"{gguf_path}: tokenizer.ggml.{_SPECIAL_TOKEN_KEYS[name]} = {token_id} is not "
                               f"a token id (the vocabulary has {len(tokens)})")
        config[name] = None if token_id is None else tokens[token_id]
    return architecture, tokenizer, config


def copy_hf_tokenizer(src: Path, out: Path) -> dict:
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if "tokenizer.json" not in copied:
        raise ConvertError(f"{src}: no tokenizer.json")
    for name in copied:
        shutil.copyfile(src / name, out / name)
    return _special_ids_from_files(out)


def _special_ids_from_files(d: Path) -> dict:
    """bos/eos/pad ids from tokenizer_config.json and tokenizer.json, without building a tokenizer."""
    try:
        tok_json = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        config = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}
    except json.JSONDecodeError as e:
        raise ConvertError(f"{d}: tokenizer files are not valid JSON ({e})") from None
    vocab = dict((tok_json.get("model") or {}).get("vocab") or {})
    vocab.update({t["content"]: t["id"] for t in tok_json.get("added_tokens", [])})
    ids = {}
    for name in ("bos", "eos", "pad"):
        token = config.get(f"{name}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            ids[f"{name}_token_id"] = int(vocab[token])
    eos = [ids["eos_token_id"]] if "eos_token_id" in ids else []
    ids["eos_token_ids"] = eos + [vocab[t] for t in SPECIAL if t in vocab and vocab[t] not in eos]
    return ids
