"""convert(): input -> lazy tensors in our layout -> AWQ scaling -> quantise per recipe -> shards."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.config import full_attention_interval

from . import awq as awq_mod
from . import writer
from .errors import ConvertError
from .imatrix import map_to_model, read_imatrix
from .plan import Item, assign_shards, plan_items, quantization_config
from .progress import Progress
from .quantize import cast
from .quantize import quantize as quantize_rows
from .recipes import MLX_BITS, MLX_GROUP_SIZES, load_recipe
from .report import render, summarise
from .source import Source, input_identity, open_source

log = logging.getLogger("deltaserve.convert")
DTYPES = ("bfloat16", "float16", "float32")
CHUNK_BYTES = 64 * 2**20  # float32 bytes of source rows processed at a time
DEFAULT_CACHE = Path("~/.cache/deltaserve/converted")
ARCHITECTURES = {"qwen3_5_moe": "Qwen3_5MoeForCausalLM", "qwen3_5": "Qwen3_5ForCausalLM"}


@dataclass(frozen=True)
class Options:
    dtype: str = "bfloat16"
    quantize: bool = False
    q_bits: int = 4
    q_group_size: int = 64
    q_recipe: str = "unsloth"
    imatrix_path: str | None = None
    awq: bool = False
    weighted_scales: bool = False
    awq_alpha: float | str = "auto"
    shard_size_bytes: int = 5 * 2**30

    @classmethod
    def make(cls, dtype="bfloat16", quantize=False, q_bits=4, q_group_size=64, q_recipe="unsloth",
             imatrix_path=None, awq=None, weighted_scales=None, awq_alpha="auto",
             shard_size_bytes=5 * 2**30) -> Options:
        if dtype not in DTYPES:
            raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
        if quantize and q_bits not in MLX_BITS:
            raise ConvertError(f"--q-bits must be one of {MLX_BITS}, not {q_bits}")
        if quantize and q_group_size not in MLX_GROUP_SIZES:
            raise ConvertError(f"--q-group-size must be one of {MLX_GROUP_SIZES}, not {q_group_size}")
        if shard_size_bytes <= 0:
            raise ConvertError("the shard size must be positive")
        if awq and imatrix_path is None:
            raise ConvertError("AWQ pre-scaling needs an imatrix (--imatrix-path)")
        if weighted_scales and not quantize:
            raise ConvertError("weighted scales apply only with --quantize")
        if awq_alpha != "auto":
            try:
                awq_alpha = float(awq_alpha)
            except (TypeError, ValueError):
                raise ConvertError(f"the AWQ alpha must be a number in [0, 1] or 'auto', not {awq_alpha!r}") from None
            if not 0 <= awq_alpha <= 1:
                raise ConvertError(f"the AWQ alpha must be in [0, 1] or 'auto', not {awq_alpha}")
        has_imatrix = imatrix_path is not None
        return cls(dtype, bool(quantize), int(q_bits), int(q_group_size), str(q_recipe),
                   str(imatrix_path) if has_imatrix else None,
                   has_imatrix if awq is None else bool(awq),
                   (has_imatrix and bool(quantize)) if weighted_scales is None else bool(weighted_scales),
                   awq_alpha, int(shard_size_bytes))


def _fingerprint(identity, options: Options, recipe_digest: str | None) -> str:
    imatrix = input_identity_file(options.imatrix_path) if options.imatrix_path else None
    data = {"format": writer.FORMAT_VERSION, "input": identity, "options": options.__dict__,
            "recipe": recipe_digest, "imatrix": imatrix}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def input_identity_file(path) -> tuple[str, int, int]:
    p = Path(path)
    if not p.is_file():
        raise ConvertError(f"{p}: no such imatrix file")
    return (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)


def convert(input_path, output_dir, *, dtype="bfloat16", quantize=False, q_bits=4, q_group_size=64,
            q_recipe="unsloth", imatrix_path=None, awq=None, weighted_scales=None, awq_alpha="auto",
            shard_size_bytes=5 * 2**30, overwrite=False, progress=None, chunk_bytes=CHUNK_BYTES) -> Path:
    """Convert a GGUF file (first part of a split one) or an HF checkpoint directory into an MLX
    checkpoint directory that model.load and mlx_lm.load open. Returns the output directory.

    awq / weighted_scales default to on when an imatrix is given; awq_alpha is a number in [0, 1] or
    "auto" (per group, the alpha with the least imatrix-weighted quantisation error; measured on the
    fixtures, a fixed 0.5 made KLD worse than no AWQ). progress: None (bar on a
    terminal, log lines otherwise), False (silent), True (bar), or a callable receiving a Status.
    Reruns resume from finished shards; a finished identical conversion returns at once."""
    options = Options.make(dtype, quantize, q_bits, q_group_size, q_recipe, imatrix_path, awq,
                           weighted_scales, awq_alpha, shard_size_bytes)
    out = Path(output_dir).expanduser()
    recipe = load_recipe(options.q_recipe) if options.quantize else None
    fingerprint = _fingerprint(input_identity(input_path), options, recipe.digest if recipe else None)
    state = writer.read_state(out) if out.is_dir() else None
    if state and state.get("complete") and state.get("fingerprint") == fingerprint and (out / "config.json").exists():
        return out
    bar = Progress(progress)
    source = open_source(input_path)
    try:
        return _convert(source, out, options, recipe, fingerprint, overwrite, bar, chunk_bytes)
    finally:
        source.close()


def _convert(source: Source, out: Path, options: Options, recipe, fingerprint, overwrite, bar, chunk_bytes) -> Path:
    shapes = source.shapes()
    items = plan_items(source.tensors, options.dtype, recipe, options.q_bits, options.q_group_size)
    importance, awq_plan = {}, None
    if options.imatrix_path:
        imatrix = read_imatrix(options.imatrix_path)
        importance = map_to_model(imatrix, source.geometry, shapes)
        if options.awq:
            auto = options.awq_alpha == "auto"
            awq_plan = awq_mod.plan_awq(shapes, importance, awq_mod.ALPHA if auto else options.awq_alpha,
                                        source.config.get("tie_word_embeddings"))
            if auto:
                bar.message("deltaserve convert: choosing AWQ alpha per group")
                specs = {i.name: i.spec for i in items}
                awq_mod.choose_alphas(awq_plan, source.tensors, specs, importance, options.dtype)
    if options.weighted_scales:
        for item in items:
            if item.spec is not None:
                item.importance = awq_mod.tensor_importance(item.name, item.tensor.shape, importance, awq_plan)
                # with an imatrix, search where it has data; without one, an MSE search everywhere
                item.search = item.importance is not None or not options.imatrix_path
    shards = assign_shards(items, options.shard_size_bytes)
    warnings = list(source.warnings) + _layer_type_warnings(source.config)
    for w in warnings:
        log.warning("deltaserve convert: warning: %s", w)

    with tempfile.TemporaryDirectory(prefix="deltaserve-tokenizer-") as tmp:
        special = source.tokenizer(Path(tmp))  # before touching the output: fails early
        state = writer.prepare(out, fingerprint, overwrite)
        _write_shards(out, shards, awq_plan, options, bar, chunk_bytes)
        for f in sorted(Path(tmp).iterdir()):
            writer.write_text(out / f.name, f.read_text(encoding="utf-8"))
    config = _output_config(source.config, options, quantization_config(items, options.q_bits, options.q_group_size), special)
    writer.write_json(out / "generation_config.json", _generation_config(source, special))
    if awq_plan and awq_plan.groups:
        _write_awq_scales(out, awq_plan, options.awq_alpha)
    summary = summarise(items)
    total = sum(i.nbytes for i in items)
    writer.write_index(out, shards, total)
    report = render(summary, _report_header(source, options, recipe, importance, awq_plan, len(shards)), warnings)
    writer.write_text(out / "convert_report.md", report)
    writer.write_json(out / "convert_report.json", summary)
    writer.write_json(out / "config.json", config)  # last: until here the directory does not load
    writer.mark_complete(out, state)
    return out


def _write_shards(out: Path, shards: list[list[Item]], awq_plan, options: Options, bar: Progress, chunk_bytes: int):
    n = len(shards)
    todo = [(i, items) for i, items in enumerate(shards) if not (out / writer.shard_name(i, n)).is_file()]
    bar.begin(sum(it.tensor.source_nbytes for _, items in todo for it in items),
              sum(len(items) for _, items in todo))
    for i, items in todo:
        shard = writer.ShardFile(out, writer.shard_name(i, n), items)
        try:
            for item in items:
                _write_item(shard, item, awq_plan, bar, chunk_bytes)
            shard.commit()
        except OSError as e:
            shard.abandon()
            raise ConvertError(f"{shard.temp}: cannot write ({e.strerror})") from None
        except BaseException:
            shard.abandon()
            raise
    bar.end()


def _write_item(shard, item: Item, awq_plan, bar: Progress, chunk_bytes: int) -> None:
    t = item.tensor
    n = t.shape[0]
    row_numel = max(1, t.numel // n)
    step = max(1, chunk_bytes // (4 * row_numel))
    outputs = item.outputs
    for a in range(0, n, step):
        b = min(n, a + step)
        x = t.rows(a, b)
        if awq_plan is not None:
            x = awq_mod.apply(x, item.name, awq_plan, a, b)
        if item.spec is None:
            parts = [cast(x, item.dtype)]
        else:
            imp = item.importance
            if imp is not None and imp.ndim == 2:  # per expert [E, in] -> rows a..b
                imp = imp[a:b, None, :]
            parts = quantize_rows(x, item.spec, item.dtype, imp, item.search)
        for o, data in zip(outputs, parts):
            shard.write(o.key, a * (o.nbytes // n), np.ascontiguousarray(data))
        t.release()  # drop the mapped source pages read so far: resident memory stays ~ one chunk
        bar.advance(t.source_nbytes * (b - a) // n)
    bar.advance(tensors=1)


def _layer_type_warnings(config: dict) -> list[str]:
    if full_attention_interval(config["layer_types"]) is None:
        return ["layer_types has no fixed full-attention interval: mlx-lm (which reads only "
                "full_attention_interval) will build the wrong layers; deltaserve's loader reads layer_types"]
    return []


def _output_config(src: dict, options: Options, quant: dict | None, special: dict) -> dict:
    c = {k: v for k, v in src.items() if k not in ("quantization", "quantization_config", "torch_dtype",
                                                      "text_config", "auto_map")}
    c["architectures"] = [ARCHITECTURES[c["model_type"]]]
    # The source's interval may be missing (transformers does not save it) or disagree with its
    # layer_types (llama.cpp's converter then writes 4); mlx-lm builds its layers from the interval.
    interval = full_attention_interval(c["layer_types"])
    if interval is not None:
        c["full_attention_interval"] = interval
    c["dtype"] = options.dtype
    if special.get("eos_token_ids"):
        c["eos_token_id"] = special["eos_token_ids"]
    for key in ("bos_token_id", "pad_token_id"):
        if key in special:
            c[key] = special[key]
    if quant:
        c["quantization"] = quant
        c["quantization_config"] = quant
    return dict(sorted(c.items()))


def _generation_config(source: Source, special: dict) -> dict:
    gen = {}
    if source.kind == "hf" and (source.path / "generation_config.json").is_file():
        try:
            gen = json.loads((source.path / "generation_config.json").read_text())
        except json.JSONDecodeError:
            gen = {}
    for key in ("bos_token_id", "pad_token_id"):
        if key in special:
            gen.setdefault(key, special[key])
    if special.get("eos_token_ids"):
        gen["eos_token_id"] = special["eos_token_ids"]
    gen.pop("transformers_version", None)
    return gen


def _write_awq_scales(out: Path, plan, alpha) -> None:
    groups = [{"name": g.name, "alpha": g.alpha, "producer": g.producer, "consumers": g.consumers}
              for g in plan.groups]
    writer.write_small_safetensors(out / "awq_scales.safetensors", {g.name: g.scale for g in plan.groups},
                                   {"alpha": str(alpha), "groups": json.dumps(groups)})


def _report_header(source: Source, options: Options, recipe, importance, awq_plan, n_shards) -> list:
    kind = f"GGUF ({', '.join(source.types)})" if source.kind == "gguf" else f"HF checkpoint ({', '.join(source.types)})"
    rows = [("source", f"{source.path.name}: {kind}, {len(source.identity)} file(s)"),
            ("model", f"{source.config['model_type']}, {source.config['num_hidden_layers']} layers"
                      + (f" + {source.config.get('mtp_num_hidden_layers')} MTP" if source.config.get("mtp_num_hidden_layers") else "")),
            ("dtype", options.dtype)]
    if options.quantize:
        rows.append(("quantisation", f"MLX affine, recipe {recipe.name}, d = {options.q_bits}, group {options.q_group_size}"))
    else:
        rows.append(("quantisation", "none (cast only)"))
    if options.imatrix_path:
        rows.append(("imatrix", f"{Path(options.imatrix_path).name}: {len(importance)} tensors"))
        rows.append(("AWQ pre-scaling", _describe_awq(options, awq_plan)))
    rows.append(("scale search", "importance-weighted" if options.weighted_scales and importance
                 else "error-weighted (no imatrix)" if options.weighted_scales else "min/max"))
    rows.append(("shards", str(n_shards)))
    return rows


def _describe_awq(options: Options, plan) -> str:
    if plan is None:
        return "off"
    text = f"alpha {options.awq_alpha}, {len(plan.groups)} groups"
    if options.awq_alpha == "auto":
        chosen = [g.alpha for g in plan.groups]
        text += " (chosen: " + ", ".join(f"{a:g} x{chosen.count(a)}" for a in sorted(set(chosen))) + ")"
    return text


def cache_key(input_path, **options) -> str:
    opts = Options.make(**options)
    recipe = load_recipe(opts.q_recipe) if opts.quantize else None
    return _fingerprint(input_identity(input_path), opts, recipe.digest if recipe else None)[:16]


def _stem(path: Path) -> str:
    name = re.sub(r"-\d{5}-of-\d{5}\.gguf$", "", path.name)
    name = re.sub(r"\.gguf$", "", name) or "model"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]


def cached_conversion(input_path, cache_root=None, **options) -> Path:
    """Convert once into cache_root/<input stem>-<key of input identity and options>; later calls
    return the complete directory. Concurrent callers wait for the first one."""
    root = Path(cache_root or DEFAULT_CACHE).expanduser()
    key = cache_key(input_path, **{k: v for k, v in options.items() if k not in ("progress", "overwrite", "chunk_bytes")})
    out = root / f"{_stem(Path(input_path))}-{key}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{out.name}.lock", "w")
    except OSError as e:
        raise ConvertError(f"{root}: cannot use the conversion cache ({e.strerror})") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return convert(input_path, out, overwrite=True, **{k: v for k, v in options.items() if k != "overwrite"})
