"""Train the demo model's MTP head for chained drafting with the trunk frozen, write it into the demo GGUF, report acceptance.

    python -m demo.train_mtp [--steps 200] [--feed true|argmax] [--out model/demo/deltaserve-demo.gguf]

Training runs in torch (as demo/train.py does; our MLX model trains ~10x slower on this CPU): the head is
transformers' own decoder layer (full attention, MoE) with fc and the two zero-centred input norms, started
from the trunk's last full-attention layer and final norm with fc passing the normed hidden state through,
so it starts as a seventh layer (any head the input GGUF carries is replaced).

What it learns is what the engine keeps (server/engine/runner.py Runner.draft): a draft counts only when it
equals the trunk's greedy token, and drafts 2..K are made from the head's own output. So the data are the
trunk's own: each training conversation's prompt (its messages before the last assistant turn) followed by
the trunk's greedy answer (the engine at temperature 0); the frozen trunk's final-normed states and argmax
come from our MLX model (what serving computes), once. The loss unrolls K = 3 drafting steps at every
position i at once: step 1 reads (h_i, token i+1) at position i and learns the trunk's argmax after i+1;
step j reads the head's own normed output of step j-1 and the token step j-1 should have drafted (`--feed
true`: the trunk's greedy token; `argmax`: its own draft) at position i+j-1, attending over step 1's KV at
positions <= i and its own chain's earlier steps (as the engine's head attends), and learns the trunk's
argmax after i+j. Step j's targets count only where tokens i+2..i+j are the trunk's greedy ones (otherwise
the engine would have rejected an earlier draft) and the target is an assistant token; the steps' losses are
weighted CHAIN_WEIGHTS. The GGUF is rewritten by convert/gguf_writer.py with the MTP block laid out as
llama.cpp lays it out (nextn.* in block n_layers); every trunk tensor keeps its bytes (checked), and the
trunk's greedy answers are checked unchanged.

Acceptance is measured in the engine (EngineCore, num_speculative_tokens = K, depth fixed, temperature 0, one
request at a time) on held-out conversations' last-turn prompts, before (the input GGUF's head, if any) and
after: per draft position k, the share of drafts k accepted (drafts 1..k all equal to the trunk's greedy
tokens: what speculative decoding keeps); its output is checked equal to plain decoding's.
"""

from __future__ import annotations

import json
import math
import platform
import random
import shutil
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from model.demo import DEMO_GGUF

from . import corpus

MTP_SEED = 2468  # the conversations the head trains on (a stream of its own)
K = 3
CHAIN_WEIGHTS = (1.0, 0.6, 0.3)  # draft 1 counts in every accepted run, draft 3 only after two hits


def tokenizer_of(gguf: Path, work: Path):
    from tokenizers import Tokenizer

    from convert.tokenizer import write_gguf_tokenizer

    tok_dir = work / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    write_gguf_tokenizer(gguf, tok_dir)
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")), tok_dir


class Head:
    """The MTP head in torch for training: transformers' own decoder layer (a one-layer Qwen3_5MoeTextModel,
    full attention, whose final norm is mtp.norm), fc and the two zero-centred input norms. It starts as a
    copy of the trunk's last full-attention layer and final norm, fc passing the normed hidden state
    through (the embedding half at zero)."""

    def __init__(self, trunk):
        import copy

        import torch
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeRMSNorm, Qwen3_5MoeTextModel

        c = copy.deepcopy(trunk.config)
        c.num_hidden_layers, c.layer_types = 1, ["full_attention"]
        c._attn_implementation = "sdpa"  # takes the boolean chain mask of `unroll` as it is
        H, eps = c.hidden_size, c.rms_norm_eps
        self.trunk = trunk
        self.block = Qwen3_5MoeTextModel(c).float()
        self.block.embed_tokens.requires_grad_(False)  # unused: the trunk's embedding is the head's
        last_full = max(i for i, t in enumerate(trunk.config.layer_types) if t == "full_attention")
        self.block.layers[0].load_state_dict(trunk.model.layers[last_full].state_dict())
        self.block.norm.load_state_dict(trunk.model.norm.state_dict())
        self.fc = torch.nn.Linear(2 * H, H, bias=False)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, H:] = torch.eye(H)
        self.enorm, self.hnorm = Qwen3_5MoeRMSNorm(H, eps), Qwen3_5MoeRMSNorm(H, eps)

    def parameters(self):
        return [p for m in (self.block, self.fc, self.enorm, self.hnorm) for p in m.parameters() if p.requires_grad]

    def unroll(self, hidden, tokens, k: int, feed: str) -> list:
        """k chained drafting steps from every root position i at once. hidden [B, N, H]: the trunk's
        final-normed h_i; tokens [B, N + k - 1]: the trunk's greedy tokens i+1, i+2, ... Step j (from 0) sits
        at position i+j and attends over step 0's KV at positions <= i and its own chain's steps 1..j (the
        engine's head: the real positions' KV, then the chained drafts'). Returns each step's logits [B, N, V]."""
        import torch
        from transformers import DynamicCache

        B, N, _ = hidden.shape
        cache = DynamicCache(config=self.block.config)
        causal, diagonal = torch.ones(N, N, dtype=torch.bool).tril(), torch.eye(N, dtype=torch.bool)
        out, h = [], hidden
        for j in range(k):
            tok = tokens[:, j:j + N] if j == 0 or feed == "true" else out[-1].argmax(-1)
            x = self.fc(torch.cat([self.enorm(self.trunk.model.embed_tokens(tok)), self.hnorm(h)], dim=-1))
            mask = torch.cat([causal] + [diagonal] * j, dim=1)[None, None].expand(B, 1, N, (j + 1) * N)
            h = self.block(inputs_embeds=x, position_ids=(torch.arange(N) + j)[None].expand(B, -1), cache=cache,
                           use_cache=True, attention_mask={"full_attention": mask, "linear_attention": None}
                           ).last_hidden_state  # the head's normed output: the next step's input
            out.append(self.trunk.lm_head(h))
        return out

    def hf_tensors(self) -> dict:
        """Under Qwen's published names (norms as w, experts fused as transformers holds them)."""
        out = {"mtp.fc.weight": self.fc.weight, "mtp.pre_fc_norm_embedding.weight": self.enorm.weight,
               "mtp.pre_fc_norm_hidden.weight": self.hnorm.weight, "mtp.norm.weight": self.block.norm.weight}
        out |= {f"mtp.layers.0.{k}": v for k, v in self.block.layers[0].state_dict().items()}
        return {k: v.detach().clone().contiguous() for k, v in out.items()}


def last_turn_prompt(s) -> list[dict]:
    """The messages before the sample's last assistant turn (what the model answers)."""
    last = max(i for i, m in enumerate(s.messages) if m["role"] == "assistant")
    return s.messages[:last]


def prompts_of(tok, samples) -> list[tuple[list[int], list[int]]]:
    """Each sample's last-turn prompt: token ids and labels (IGNORE outside earlier assistant turns)."""
    from .train import encode

    return [encode(tok, corpus.render(last_turn_prompt(s), s.tools, add_generation_prompt=True))[:2]
            for s in samples]


def run_engine(lm, prompts: list[list[int]], new_tokens: int, k: int = 0, one_at_a_time: bool = False):
    """The engine's greedy answers to `prompts` (all in one batch, or one request at a time), drafting k
    tokens per step at a fixed depth; returns (answers, the EngineCore: its drafted/accepted counters)."""
    from server.engine import EngineConfig, EngineCore, SamplingParams

    core = EngineCore(*lm, EngineConfig(prefix_cache_bytes=0, memory_budget_bytes=1 << 30,
                                        num_speculative_tokens=k, speculative_adapt=False))
    out = {}
    core.emit = lambda d: out.setdefault(d.request_id, []).extend(d.token_ids)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    ids = []
    for group in ([[p] for p in prompts] if one_at_a_time else [prompts]):
        ids += [core.add(p, params).id for p in group]
        while core.has_work():
            core.step()
    return [out.get(i, []) for i in ids], core


def acceptance(lm, prompts: list[list[int]], new_tokens: int) -> dict:
    """Per draft position k = 1..K, in the engine at depth K, one request at a time: drafts k made and
    accepted (drafts 1..k all equal to the trunk's greedy tokens), and whether the answers equal plain
    decoding's."""
    t = time.perf_counter()
    plain, _ = run_engine(lm, prompts, new_tokens)
    spec, core = run_engine(lm, prompts, new_tokens, k=K, one_at_a_time=True)
    return {"drafted": core.drafted, "accepted": core.accepted,
            "rate": [round(a / max(d, 1), 4) for a, d in zip(core.accepted, core.drafted)],
            "same_as_plain": spec == plain, "prompts": len(prompts), "new_tokens": new_tokens,
            "seconds": round(time.perf_counter() - t, 1)}


def trunk_rows(model, prompts, answers, max_len: int) -> list[dict]:
    """Per conversation (prompt + the trunk's greedy answer), the last max_len positions of: ids, the
    trunk's final-normed states h and argmax (our MLX model, float32), `label` (1 where the token is an
    assistant token: earlier turns' or the answer's) and `greedy` (1 where token p is the trunk's argmax
    after p-1)."""
    import mlx.core as mx
    import numpy as np

    rows = []
    for (ids, labels), answer in zip(prompts, answers):
        seq = ids + answer
        logits, hidden = model(mx.array([seq]), model.make_cache(1), return_hidden=True)
        argmax = np.array(mx.argmax(logits[0], axis=-1))
        label = np.array([float(y >= 0) for y in labels] + [1.0] * len(answer))
        greedy = np.concatenate([[0.0], (np.array(seq[1:]) == argmax[:-1]).astype(np.float64)])
        rows.append({"ids": np.array(seq)[-max_len:], "h": np.array(hidden[0].astype(mx.float32))[-max_len:],
                     "argmax": argmax[-max_len:], "label": label[-max_len:], "greedy": greedy[-max_len:]})
    return rows


def batches(rows: list[dict], batch: int, pad_id: int) -> list[dict]:
    """Similar-length conversations together (less padding), padded at the end: torch tensors [B, T(, H)]."""
    import numpy as np
    import torch

    rows = sorted(rows, key=lambda r: len(r["ids"]))
    out = []
    for i in range(0, len(rows), batch):
        group = rows[i:i + batch]
        T = max(len(r["ids"]) for r in group)
        b = {}
        for key, fill, dtype in (("ids", pad_id, torch.long), ("argmax", pad_id, torch.long),
                                 ("label", 0.0, torch.float32), ("greedy", 0.0, torch.float32)):
            b[key] = torch.tensor(np.stack([np.pad(r[key], (0, T - len(r[key])), constant_values=fill) for r in group]),
                                  dtype=dtype)
        b["h"] = torch.tensor(np.stack([np.pad(r["h"], ((0, T - len(r["h"])), (0, 0))) for r in group]))
        out.append(b)
    return out


def chain_losses(head: Head, b: dict, feed: str) -> list:
    """Per drafting step j (from 0) at every root i: cross-entropy against the trunk's argmax after i+j+1,
    counted where the target is an assistant token and tokens i+2..i+j+1 are the trunk's greedy ones."""
    import torch

    N = b["ids"].shape[1] - K - 1
    logits = head.unroll(b["h"][:, :N], b["ids"][:, 1:N + K], K, feed)
    losses, chain = [], torch.ones_like(b["label"][:, :N])
    for j, lg in enumerate(logits):
        if j:
            chain = chain * b["greedy"][:, j + 1:j + 1 + N]
        w = chain * b["label"][:, j + 2:j + 2 + N]
        ce = torch.nn.functional.cross_entropy(lg.transpose(1, 2), b["argmax"][:, j + 1:j + 1 + N], reduction="none")
        losses.append((ce * w).sum() / w.sum().clamp(min=1.0))
    return losses


def train(head: Head, data: list[dict], steps: int, lr: float, feed: str, log=print) -> list[dict]:
    import torch

    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(MTP_SEED)
    history, t0, running = [], time.perf_counter(), []
    for step in range(steps):
        losses = chain_losses(head, rng.choice(data), feed)
        loss = sum(w * x for w, x in zip(CHAIN_WEIGHTS, losses))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running.append([float(x.detach()) for x in losses])
        if (step + 1) % 25 == 0 or step + 1 == steps:
            per_step = [round(sum(r[j] for r in running) / len(running), 4) for j in range(K)]
            history.append({"step": step + 1, "loss": per_step, "seconds": round(time.perf_counter() - t0, 1)})
            running = []
            log(f"step {step + 1}/{steps}: loss per draft position {per_step} ({history[-1]['seconds']} s)")
    return history


def write_with_head(gguf: Path, head: Head, tok_dir: Path, work: Path, out: Path) -> None:
    """The trunk (as demo/grow.py read it from the GGUF) and the head as an HF checkpoint, written by
    gguf_writer with mtp=True; the trunk's tensors must come out byte for byte as they went in."""
    import gguf as gguf_py
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    from convert.gguf_writer import write_gguf

    from .build import MODEL_NAME
    from .train import save_checkpoint

    hf_dir = work / MODEL_NAME
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    save_checkpoint(head.trunk, tok_dir, hf_dir)
    (st,) = hf_dir.glob("*.safetensors")
    tensors = load_file(st) | {k: v.to(torch.bfloat16) for k, v in head.hf_tensors().items()}
    save_file(tensors, st, metadata={"format": "pt"})
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"mtp_num_hidden_layers": 1}, indent=2) + "\n")
    tmp = work / "with-mtp.gguf"
    write_gguf(hf_dir, tmp, name=MODEL_NAME, mtp=True)

    n = head.trunk.config.num_hidden_layers
    old, new = gguf_py.GGUFReader(gguf), gguf_py.GGUFReader(tmp)
    before = {t.name: np.asarray(t.data).tobytes() for t in old.tensors if not t.name.startswith(f"blk.{n}.")}
    after = {t.name: np.asarray(t.data).tobytes() for t in new.tensors}
    changed = [k for k, v in before.items() if after.get(k) != v]
    if changed:
        raise RuntimeError(f"rewriting the GGUF changed trunk tensors: {changed[:4]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(tmp), out)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import torch

    from convert import convert
    from model import load

    from .build import _build_info_of, _sha256, record_path, summary
    from .grow import load_gguf
    from .train import token_ids

    p = argparse.ArgumentParser(prog="python -m demo.train_mtp", description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=DEMO_GGUF, help="the trained demo model (default: the committed one)")
    p.add_argument("--out", type=Path, default=DEMO_GGUF, help="where the GGUF with the head goes")
    p.add_argument("--work", type=Path, default=Path(".cache/demo-mtp"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--feed", choices=("true", "argmax"), default="true",
                   help="the token chained steps read: the trunk's greedy one, or the head's own draft")
    p.add_argument("--max-len", type=int, default=320, help="positions kept of each training conversation (its end)")
    p.add_argument("--answer-tokens", type=int, default=128, help="at most this many greedy answer tokens")
    p.add_argument("--conversations", type=int, default=120)
    p.add_argument("--heldout", type=int, default=16, help="held-out conversations for the acceptance")
    args = p.parse_args(argv)
    if not args.gguf.is_file():
        p.error(f"{args.gguf}: no such GGUF")
    if min(args.steps, args.batch, args.heldout, args.conversations, args.answer_tokens) < 1:
        p.error("--steps, --batch, --heldout, --conversations and --answer-tokens must be positive")
    if args.max_len < K + 3:
        p.error(f"--max-len must be at least {K + 3}")
    torch.manual_seed(MTP_SEED)
    args.work.mkdir(parents=True, exist_ok=True)
    init_sha256 = _sha256(args.gguf)
    init_build = _build_info_of(args.gguf, init_sha256)
    timings, t = {}, time.perf_counter()

    trunk, _ = load_gguf(args.gguf)
    trunk.requires_grad_(False)
    tok, tok_dir = tokenizer_of(args.gguf, args.work)
    eos_id, pad_id = token_ids(tok)
    # what serving loads: the GGUF converted, in MLX
    before = load(convert(args.gguf, args.work / "input", dtype="float32", progress=False, overwrite=True),
                  dtype="float32")
    heldout = [ids for ids, _ in prompts_of(tok, corpus.generate("heldout", args.heldout, reasoning="lookup"))]
    acc_before = acceptance(before, heldout, 48) if before[0].config.mtp_num_hidden_layers else None
    if acc_before:
        print(f"the input's head, in the engine: accepted {acc_before['rate']} per draft position", flush=True)
    timings["prepare_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    prompts = prompts_of(tok, corpus.generate("train", args.conversations, seed=MTP_SEED, reasoning="lookup",
                                              open_values=0.5))
    answers, _ = run_engine(before, [ids for ids, _ in prompts], args.answer_tokens)
    print(f"greedy answers: {round(time.perf_counter() - t, 1)} s", flush=True)
    rows = trunk_rows(before[0], prompts, answers, args.max_len)
    data = batches(rows, args.batch, pad_id)
    timings["trunk_s"] = round(time.perf_counter() - t, 1)
    print(f"{len(rows)} conversations, {sum(len(r['ids']) for r in rows)} positions "
          f"({sum(map(len, answers))} in greedy answers): {timings['trunk_s']} s", flush=True)

    t = time.perf_counter()
    head = Head(trunk)
    history = train(head, data, args.steps, args.lr, args.feed, log=lambda m: print(m, flush=True))
    timings["train_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    write_with_head(args.gguf, head, tok_dir, args.work, args.out)
    timings["gguf_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    after = load(convert(args.out, args.work / "served", dtype="float32", progress=False, overwrite=True),
                 dtype="float32")
    if run_engine(after, heldout, 48)[0] != run_engine(before, heldout, 48)[0]:
        raise RuntimeError("the trunk's greedy answers changed with the new head")
    acc = acceptance(after, heldout, 48)
    timings["acceptance_s"] = round(time.perf_counter() - t, 1)
    print(f"the new head, in the engine: accepted {acc['rate']} per draft position "
          f"(drafted {acc['drafted']}; same tokens as plain decoding: {acc['same_as_plain']})", flush=True)

    info = {
        "command": " ".join([Path(sys.executable).name, "-m", "demo.train_mtp", *sys.argv[1:]]),
        "built": datetime.now(timezone.utc).date().isoformat(),
        "gguf": args.out.name, "gguf_bytes": args.out.stat().st_size, "gguf_sha256": _sha256(args.out),
        "parameters": (init_build or {}).get("parameters"),
        "mtp_parameters": sum(v.numel() for v in head.hf_tensors().values()),
        "shape": (init_build or {}).get("shape"), "vocab_size": tok.get_vocab_size(),
        "mtp_train": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "feed": args.feed,
                      "chain_weights": CHAIN_WEIGHTS, "max_len": args.max_len, "answer_tokens": args.answer_tokens,
                      "conversations": args.conversations, "seed": MTP_SEED, "loss_history": history},
        "final_loss": (init_build or {}).get("final_loss"),
        "mtp_final_loss": history[-1]["loss"], "acceptance_before": acc_before, "acceptance": acc,
        "timings": timings, "init_sha256": init_sha256, "init_build": init_build,
        "software": {d: metadata.version(d) for d in ("mlx", "torch", "transformers", "tokenizers", "gguf")}
        | {"python": platform.python_version()},
        "machine": {"platform": platform.platform()},
    }
    record_path(args.out).write_text(json.dumps(info, indent=2) + "\n")
    short = summary(info) | {"mtp_acceptance": acc["rate"]}  # per draft position, in the engine
    (args.out.parent / "build.json").write_text(json.dumps(short, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
