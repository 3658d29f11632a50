"""Build the embedded demo model end to end, seeded: corpus -> tokenizer -> training -> BF16 GGUF.

    python -m demo.build                      # the committed model (model/demo/deltaserve-demo.gguf)
    python -m demo.build --steps 20 --out /tmp/demo.gguf --work /tmp/demo-work   # a quick trial
    python -m demo.build --procs 2 --steps 750 ...  # the same batches, two per step, on two cores
    python -m demo.build --extend 2500 --extensions 2 ...  # then twice 2500 more steps, each on new conversations
    python -m demo.build --extensions 3 --open-values 0.5 --open-from 3 ...  # the third on open values
    python -m demo.build --init prev.gguf --init-schedules 4 --extensions 4 --widen-at 4 ...
        # train a fourth extension on from a GGUF's model (after its 4 schedules), widened first (grow.widen)

With --extend, a work directory that holds finished schedules' states (train_state.pt, train_state_extend*.pt)
resumes from them, so a further extension trains on from that model instead of starting over.

The work directory keeps the tokenizer and the HF checkpoint (bf16) the GGUF is written from.
build_info.json records the command, the software, the shape, the loss curve, the timings and the builds
this one continued; it lies next to the GGUF, except the committed model's, which lies here, out of the
wheel. build.json next to the GGUF is the short record that ships with it.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from model.demo import DEMO_GGUF

from . import corpus
from .train import ModelShape, TrainConfig

MODEL_NAME = "deltaserve-demo"
COMMITTED_RECORD = Path(__file__).resolve().parent / "build_info.json"  # the full record of DEMO_GGUF
VOCAB_SIZE = 4087  # learned tokens; + 9 added tokens = 4096
TRAIN_SAMPLES_SLACK = 1.05


def lookup_tokens(tok) -> tuple[int, int, int]:
    """The lookup drills' (quote, listed, unlisted) tokens: those the "lookup" reasoning decides with
    ('Do my tools have "get_weather' then '",' or '"?'), each one token of this tokenizer."""
    ids = [tok.encode(text).ids for text in (' "', '",', '"?')]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"lookup drills need ' \"', '\",' and '\"?' to be single tokens, not {ids}")
    return tuple(i[0] for i in ids)


def samples_for(steps: int, cfg: TrainConfig) -> int:
    """Conversations for a schedule of `steps`: a little over one pass, so no conversation is seen twice."""
    return int(steps * cfg.procs * cfg.batch_size * TRAIN_SAMPLES_SLACK) + cfg.bucket


def build(out: Path, work: Path, shape: ModelShape, cfg: TrainConfig, vocab_size: int = VOCAB_SIZE,
          log=print) -> dict:
    import torch

    from convert.gguf_writer import write_gguf

    from .grow import load_gguf, shape_of, widen
    from .tokenizer import save_hf_tokenizer, train_bpe
    from .train import (encode, extension_state, induction_init, model_config, recall_init, save_checkpoint,
                        schedule_config, token_ids, train_parallel)

    timings = {}
    t = time.perf_counter()
    # what this build continues, read before anything is written (out may be the --init file itself)
    init_sha256 = _sha256(Path(cfg.init)) if cfg.init else None
    init_build = _build_info_of(Path(cfg.init), init_sha256) if cfg.init else None
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    work.mkdir(parents=True, exist_ok=True)

    n_samples = samples_for(cfg.steps, cfg)
    n_more = samples_for(cfg.extend, cfg) if cfg.extend else 0
    # the extensions' conversations continue the same stream: the earlier ones are the same either way;
    # the schedules from open_from on draw theirs from a second stream, with open values, and those from
    # wild_from on from a third, with wild values too
    sizes = [n_samples] + [n_more] * (cfg.extensions if cfg.extend else 0)
    if cfg.extend and cfg.extensions and cfg.last_extend:
        sizes[-1] = samples_for(cfg.last_extend, cfg)
    n_closed = sum(sizes[:cfg.open_from]) if cfg.open_values else sum(sizes)
    n_wild = sum(sizes[cfg.wild_from:]) if cfg.wild_values else 0
    samples = corpus.generate("train", n_closed, reasoning=cfg.reasoning)
    samples += corpus.generate("train", sum(sizes) - n_closed - n_wild, seed=corpus.OPEN_SEED,
                               reasoning=cfg.reasoning, open_values=cfg.open_values)
    samples += corpus.generate("train", n_wild, seed=corpus.WILD_SEED, reasoning=cfg.reasoning,
                               open_values=cfg.open_values, wild_values=cfg.wild_values)
    template = corpus.chat_template()
    texts = [corpus.render_sample(s, template) for s in samples]
    timings["corpus_s"] = round(time.perf_counter() - t, 1)
    log(f"corpus: {len(texts)} conversations, {sum(map(len, texts)) / len(texts):.0f} chars each")

    t = time.perf_counter()
    tok_dir = work / "tokenizer"
    if cfg.init:  # the tokenizer the GGUF carries (the one its model was trained with)
        from tokenizers import Tokenizer

        from convert.tokenizer import write_gguf_tokenizer

        tok_dir.mkdir(parents=True, exist_ok=True)
        write_gguf_tokenizer(Path(cfg.init), tok_dir)
        tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    else:
        tok = train_bpe(texts[:n_samples], vocab_size)  # the first schedule's conversations only
        save_hf_tokenizer(tok, tok_dir, template)
    first = sum(sizes[:cfg.init_schedules])  # the conversations of schedules the GGUF has had are not needed
    ends = bool(cfg.focus_ends)  # the loss focus takes in where each argument value ends
    rows = [None] * first + [encode(tok, text, ends) for text in texts[first:]]
    timings["tokenizer_s"] = round(time.perf_counter() - t, 1)
    n_tokens = sum(len(r[0]) for r in rows[first:])
    n_loss = sum(sum(1 for y in r[1] if y >= 0) for r in rows[first:])
    rows, more_rows = rows[:n_samples], rows[n_samples:]
    log(f"tokenizer: {tok.get_vocab_size()} tokens; corpus {n_tokens} tokens ({n_loss} in the loss)")

    from transformers import Qwen3_5MoeForCausalLM

    eos_id, pad_id = token_ids(tok)
    if cfg.init:
        model, init_shape = load_gguf(Path(cfg.init), cfg.router_aux_loss_coef)
        if init_shape != shape:
            raise ValueError(f"{cfg.init} holds a model of another shape than asked for: {init_shape}")
        log(f"init: {cfg.init}, after {cfg.init_schedules} schedules")
    else:
        config = model_config(shape, tok.get_vocab_size(), eos_id, pad_id, cfg.router_aux_loss_coef)
        torch.manual_seed(cfg.seed)
        model = Qwen3_5MoeForCausalLM(config).float()
    if cfg.induction:
        built = induction_init(model, kv_heads=cfg.induction_heads, plain_after=bool(cfg.induction_plain_after))
        log(f"induction init: layers {built}")
    if cfg.recall_layers:
        log(f"recall init: layers {recall_init(model, cfg.recall_layers, cfg.recall_log_decay)}")
    model.config.to_json_file(work / "config.json")
    drill_tokens = lookup_tokens(tok) if cfg.lookup_rows else ()
    t = time.perf_counter()
    history, seconds, result = [], 0.0, {"steps": 0, "tokens": 0}
    if cfg.init_schedules == 0:
        result = train_parallel(model, rows, schedule_config(cfg, 0), pad_id, work / "train_state.pt", log=log,
                                lookup_tokens=drill_tokens)
        history, seconds = result["history"], result["seconds"]
    # no extension after a --stop-after trial of the first schedule
    extensions = cfg.extensions if cfg.extend and (cfg.init_schedules or result["steps"] == cfg.steps) else 0
    for k in range(max(1, cfg.init_schedules), extensions + 1):
        if k == cfg.widen_at:
            model = widen(model, cfg.widen_hidden, cfg.widen_heads, cfg.widen_kv_heads, seed=cfg.seed)
            log(f"widened to hidden {cfg.widen_hidden}, {cfg.widen_heads} heads over {cfg.widen_kv_heads}: "
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
        stage_rows = more_rows[sum(sizes[1:k]):sum(sizes[1:k + 1])]
        if cfg.missing_twins:  # beside the schedule's own conversations, twins of some of its calls
            lo, rng = sum(sizes[:k]), random.Random(f"{cfg.seed}-twins-{k}")
            twins = [corpus.missing_twin(s, rng) for s in samples[lo:lo + len(stage_rows)]
                     if rng.random() < cfg.missing_twins]
            stage_rows = stage_rows + [encode(tok, corpus.render_sample(s, template), ends) for s in twins if s]
            log(f"extension {k}: {len(stage_rows) - sizes[k]} missing-tool twins")
        stage = schedule_config(cfg, k)
        log(f"extension {k}/{cfg.extensions}: {stage.steps} steps on {len(stage_rows)} more conversations"
            f"{f' with open values {stage.open_values}' if stage.open_values else ''}"
            f"{f' (wild {stage.wild_values})' if stage.wild_values else ''}, peak lr {cfg.extend_lr}")
        more = train_parallel(model, stage_rows, stage, pad_id, work / extension_state(k), log=log,
                              lookup_tokens=drill_tokens)
        history = history + [e | {"step": e["step"] + result["steps"], "tokens": e["tokens"] + result["tokens"]}
                             for e in more["history"]]
        seconds += more["seconds"]
        result = {"steps": result["steps"] + more["steps"], "tokens": result["tokens"] + more["tokens"]}
    n_params = sum(p.numel() for p in model.parameters())
    timings["train_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    hf_dir = work / MODEL_NAME
    save_checkpoint(model, tok_dir, hf_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(hf_dir, out, name=MODEL_NAME)
    timings["gguf_s"] = round(time.perf_counter() - t, 1)

    info = {
        "command": " ".join([Path(sys.executable).name, "-m", "demo.build", *sys.argv[1:]]),
        "built": datetime.now(timezone.utc).date().isoformat(),
        "gguf": out.name, "gguf_bytes": out.stat().st_size, "gguf_sha256": _sha256(out), "parameters": n_params,
        "shape": asdict(shape_of(model.config)), "train": asdict(cfg), "vocab_size": tok.get_vocab_size(),
        "corpus": {"conversations": len(texts), "tokens": n_tokens, "loss_tokens": n_loss},
        "timings": timings, "train_seconds_total": round(seconds, 1),
        "final_loss": history[-1]["loss"] if history else None,
        "tokens_trained": result["tokens"], "loss_history": history,
        "init_sha256": init_sha256,  # which GGUF this build continued
        "init_build": init_build,  # and that GGUF's own build_info, where one is kept
        "software": {d: metadata.version(d) for d in ("torch", "transformers", "tokenizers", "gguf")}
        | {"python": platform.python_version()},
        "machine": {"cpu_threads": cfg.threads, "processes": cfg.procs, "platform": platform.platform()},
    }
    record_path(out).write_text(json.dumps(info, indent=2) + "\n")
    (out.parent / "build.json").write_text(json.dumps(summary(info), indent=2) + "\n")
    return info


def record_path(gguf: Path) -> Path:
    """Where the full build record of a GGUF is kept: beside it, except for the committed model's."""
    return COMMITTED_RECORD if gguf.resolve() == DEMO_GGUF else gguf.parent / "build_info.json"


def summary(info: dict) -> dict:
    """The short record that ships beside a GGUF (build.json): which file, its shape, when, and the commands
    of the builds it continued, first to last, as they were run."""
    commands, record = [], info
    while record:
        commands.insert(0, record["command"])
        record = record.get("init_build")
    keys = ("gguf_sha256", "gguf_bytes", "built", "parameters", "vocab_size", "shape", "final_loss", "software",
            "note")
    return {k: info[k] for k in keys if k in info} | {"commands": commands}


def _build_info_of(gguf: Path, sha256: str) -> dict | None:
    """The full build record of a GGUF (see record_path) when it describes that file (its sha256, given; builds
    that did not record one: its size), else None (also when it is not a JSON object: provenance only)."""
    path = record_path(gguf)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(info, dict):
        return None
    if "gguf_sha256" in info:
        return info if info["gguf_sha256"] == sha256 else None
    return info if info.get("gguf_bytes") == gguf.stat().st_size else None


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    import argparse

    shape, cfg = ModelShape(), TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEMO_GGUF)
    p.add_argument("--work", type=Path, default=Path(".cache/demo-build"))
    p.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    for name, value in [*asdict(cfg).items(), *asdict(shape).items()]:
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    if args.steps < 1 or args.extend < 0 or args.extensions < 0 or args.extend_lr <= 0 or args.last_extend < 0:
        # (a negative count would cut the first corpus)
        p.error(f"--steps must be 1 or more, --extend, --extensions and --last-extend 0 or more and --extend-lr "
                f"positive (got {args.steps}, {args.extend}, {args.extensions}, {args.last_extend}, {args.extend_lr})")
    if not 0 <= args.open_values <= 1 or args.open_from < 0:
        # (an --open-from past the last extension leaves every schedule without open values)
        p.error(f"--open-values is a share from 0 to 1 and --open-from a schedule, 0 (the first) or more "
                f"(got {args.open_values}, {args.open_from})")
    if args.wild_values and not (0 < args.wild_values <= 1 and args.open_values and args.wild_from >= args.open_from):
        # (wild values are a share of the open values)
        p.error(f"--wild-values is a share from 0 to 1 of the open values: it needs --open-values and a --wild-from "
                f"of --open-from or later (got {args.wild_values}, {args.open_values}, {args.wild_from}, {args.open_from})")
    if args.copy_uniform not in (0, 1) or args.copy_rows < 0 or (args.copy_uniform and not args.copy_rows):
        p.error(f"--copy-uniform is 0 or 1 and draws the tokens of copy drills, so 1 needs --copy-rows 1 or more "
                f"(got --copy-uniform {args.copy_uniform}, --copy-rows {args.copy_rows})")
    if args.lookup_rows < 0:
        p.error(f"--lookup-rows must be 0 or more (got {args.lookup_rows})")
    if args.focus_ends not in (0, 1):
        p.error(f"--focus-ends is 0 or 1 (got {args.focus_ends})")
    if args.missing_twins and not (0 < args.missing_twins <= 1 and args.reasoning == "lookup"):
        p.error(f"--missing-twins is a share from 0 to 1 of the calls, twinned with lookup reasoning, so it needs "
                f"--reasoning lookup (got {args.missing_twins}, --reasoning {args.reasoning})")
    if args.init and not Path(args.init).is_file():
        p.error(f"--init {args.init}: no such file")
    if args.init_schedules and not args.init or args.init_schedules < 0 or (args.init and not args.init_schedules):
        p.error("--init GGUF and --init-schedules K (1 or more: the schedules its model has had) go together")
    if args.init and (args.init_schedules > args.extensions or not args.extend):
        p.error(f"--init-schedules {args.init_schedules} leaves no schedule to train (--extensions {args.extensions}, "
                f"--extend {args.extend})")
    if args.init and (args.induction or args.recall_layers):
        p.error("--induction and --recall-layers build layers of an untrained model, not of one loaded with --init")
    if args.widen_at and not max(1, args.init_schedules) <= args.widen_at <= args.extensions:
        p.error(f"--widen-at {args.widen_at} is not an extension this build trains "
                f"({max(1, args.init_schedules)} to {args.extensions})")
    shape = ModelShape(**{k: getattr(args, k) for k in asdict(shape)})
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(cfg)})
    if cfg.procs == 1 and cfg.threads == 1 and hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        # the weights depend, in the last bits, on how many cores the process could see when it started
        # (even with one thread), so a one-process build restarts itself on one core to give the same ones
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        os.execv(sys.executable, [sys.executable, "-m", "demo.build", *(sys.argv[1:] if argv is None else argv)])
    t = time.perf_counter()
    info = build(args.out, args.work, shape, cfg, args.vocab_size)
    print(f"wrote {args.out} ({info['gguf_bytes'] / 1e6:.1f} MB) in {time.perf_counter() - t:.0f}s; "
          f"timings {info['timings']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
