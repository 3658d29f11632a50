"""Train the demo model's MTP head with the trunk frozen, write it into the demo GGUF, report acceptance.

    python -m demo.train_mtp [--steps 600] [--out model/demo/deltaserve-demo.gguf]

Training runs in torch (as demo/train.py does; our MLX model trains ~10x slower on this CPU): the trunk
is the GGUF read back into transformers (demo/grow.py), frozen; the head is transformers' own decoder
layer (full attention, MoE) with fc and the two zero-centred input norms, started from the trunk's last
full-attention layer and final norm with fc passing the normed hidden state through, so it starts as
a seventh layer. At position i it reads the trunk's final-normed h_i and the embedding of token i+1 and
learns (cross-entropy) the trunk's own greedy token after next (its argmax at i+1), on assistant
tokens, where drafting happens; the frozen trunk's states are computed once. The GGUF is rewritten by
convert/gguf_writer.py with the MTP block laid out as llama.cpp lays it out (nextn.* in block
n_layers); every trunk tensor keeps its bytes (checked).

Acceptance, measured by our MLX model (model/mtp.py) on the written GGUF as serving converts it: held-out conversations, the trunk generates greedily
from each one's last assistant turn; at every generated position t the head drafts K = 3 tokens, the
first from (h_t, the trunk's token t+1), each next one from its own hidden output and drafted token.
Draft k is accepted when it equals the trunk's own greedy token t+1+k; reported per draft position
alone and chained (drafts 1..k all accepted, what speculative decoding keeps).
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

    def __call__(self, hidden, next_tokens):
        """hidden [B, T, H] (the trunk's final-normed state), next_tokens [B, T] -> logits [B, T, V]."""
        import torch

        e = self.trunk.model.embed_tokens(next_tokens)
        x = self.fc(torch.cat([self.enorm(e), self.hnorm(hidden)], dim=-1))
        pos = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        return self.trunk.lm_head(self.block(inputs_embeds=x, position_ids=pos).last_hidden_state)

    def hf_tensors(self) -> dict:
        """Under Qwen's published names (norms as w, experts fused as transformers holds them)."""
        out = {"mtp.fc.weight": self.fc.weight, "mtp.pre_fc_norm_embedding.weight": self.enorm.weight,
               "mtp.pre_fc_norm_hidden.weight": self.hnorm.weight, "mtp.norm.weight": self.block.norm.weight}
        out |= {f"mtp.layers.0.{k}": v for k, v in self.block.layers[0].state_dict().items()}
        return {k: v.detach().clone().contiguous() for k, v in out.items()}


def encode_rows(tok, samples, max_len: int):
    from .train import encode

    rows = []
    for s in samples:
        ids, labels, _ = encode(tok, corpus.render_sample(s))
        rows.append((ids[-max_len:], labels[-max_len:]))  # the end: the last turns, assistant text
    return rows


def batch_tensors(rows, pad_id: int):
    import torch

    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    weight = torch.zeros((len(rows), T - 2))  # position i: the target is token i+2
    for b, (r, labels) in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r)
        weight[b, :len(r) - 2] = torch.tensor([float(y >= 0) for y in labels[2:]])
    return ids, weight


def trunk_states(trunk, rows, batch: int, pad_id: int) -> list[tuple]:
    """Per batch of similar-length conversations, what the frozen trunk gives the head once for all steps:
    (ids [B, T], h [B, T, H] after the final norm, the trunk's greedy token after next for positions
    0..T-3 [B, T-2], the loss weight [B, T-2])."""
    import torch

    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths together: less padding
    out = []
    with torch.no_grad():
        for i in range(0, len(order), batch):
            ids, weight = batch_tensors([rows[j] for j in order[i:i + batch]], pad_id)
            hidden = trunk.model(input_ids=ids).last_hidden_state
            target = trunk.lm_head(hidden[:, 1:-1]).argmax(-1)  # the trunk at i+1: its greedy token i+2
            out.append((ids, hidden, target, weight))
    return out


def train(head: Head, states: list[tuple], steps: int, lr: float, log=print) -> list[dict]:
    """Cross-entropy against the trunk's own greedy token after next (what a draft must equal)."""
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
        ids, hidden, target, weight = rng.choice(states)
        logits = head(hidden[:, :-2], ids[:, 1:-1])
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        loss = (ce * weight).sum() / weight.sum().clamp(min=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        running.append(float(loss.detach()))
        if (step + 1) % 25 == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": round(sum(running) / len(running), 4),
                            "seconds": round(time.perf_counter() - t0, 1)})
            running = []
            log(f"step {step + 1}/{steps}: loss {history[-1]['loss']} ({history[-1]['seconds']} s)")
    return history


def last_turn_prompt(s) -> list[dict]:
    """The messages before the sample's last assistant turn (what the model answers)."""
    last = max(i for i, m in enumerate(s.messages) if m["role"] == "assistant")
    return s.messages[:last]


def acceptance(model, tok, samples, new_tokens: int = 48, eos_id: int | None = None) -> dict:
    """Per draft position k = 1..K: the share of generated positions where draft k equals the trunk's greedy
    token (alone), and where drafts 1..k all do (chained). `model` carries its MTP head."""
    import mlx.core as mx

    alone, chained, n = [0] * K, [0] * K, [0] * K
    for s in samples:
        prompt = tok.encode(corpus.render(last_turn_prompt(s), s.tools, add_generation_prompt=True),
                            add_special_tokens=False).ids
        cache = model.make_cache(1)
        logits, hidden = model(mx.array([prompt]), cache, return_hidden=True)
        hs, seq = [hidden], list(prompt)
        for _ in range(new_tokens):
            nxt = int(mx.argmax(logits[0, -1]))
            seq.append(nxt)
            if nxt == eos_id:
                break
            logits, hidden = model(mx.array([[nxt]]), cache, return_hidden=True)
            hs.append(hidden)
        hidden = mx.concatenate(hs, axis=1)  # [1, len(seq) - 1 or len(seq), H]: h_t for t < len(seq) - 1 at least
        P = len(prompt)
        mtp_cache = model.make_mtp_cache(1)
        model.draft(hidden[:, :P - 1], mx.array([seq[1:P]]), mtp_cache)  # the prompt's own positions
        for t in range(P - 1, len(seq) - 2):  # the trunk's token t+1 is generated: a draft step follows it
            out, h = model.draft(hidden[:, t:t + 1], mx.array([[seq[t + 1]]]), mtp_cache)
            chain = mtp_cache.select([0])
            drafts = []
            for k in range(K):
                if k:
                    out, h = model.draft(h, mx.array([[drafts[-1]]]), chain)
                drafts.append(int(mx.argmax(out[0, -1])))
            ok = True
            for k in range(K):
                if t + 2 + k >= len(seq):
                    break
                hit = drafts[k] == seq[t + 2 + k]
                ok = ok and hit
                n[k] += 1
                alone[k] += hit
                chained[k] += ok
    return {"positions": n, "alone": [round(a / max(m, 1), 4) for a, m in zip(alone, n)],
            "chained": [round(c / max(m, 1), 4) for c, m in zip(chained, n)], "conversations": len(samples)}


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
    from model import load_model

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
    p.add_argument("--max-len", type=int, default=320, help="tokens kept of each training conversation (its end)")
    p.add_argument("--conversations", type=int, default=120)
    p.add_argument("--heldout", type=int, default=16, help="held-out conversations for the acceptance")
    args = p.parse_args(argv)
    if not args.gguf.is_file():
        p.error(f"{args.gguf}: no such GGUF")
    if args.steps < 1 or args.batch < 1 or args.heldout < 1:
        p.error("--steps, --batch and --heldout must be positive")
    torch.manual_seed(MTP_SEED)
    args.work.mkdir(parents=True, exist_ok=True)
    init_sha256 = _sha256(args.gguf)
    init_build = _build_info_of(args.gguf, init_sha256)
    timings, t = {}, time.perf_counter()

    trunk, _ = load_gguf(args.gguf)
    trunk.requires_grad_(False)
    tok, tok_dir = tokenizer_of(args.gguf, args.work)
    eos_id, pad_id = token_ids(tok)
    samples = corpus.generate("train", args.conversations, seed=MTP_SEED, reasoning="lookup", open_values=0.5)
    rows = encode_rows(tok, samples, args.max_len)
    timings["prepare_s"] = round(time.perf_counter() - t, 1)
    print(f"{len(rows)} conversations, {sum(len(r[0]) for r in rows)} tokens", flush=True)

    t = time.perf_counter()
    states = trunk_states(trunk, rows, args.batch, pad_id)
    timings["trunk_s"] = round(time.perf_counter() - t, 1)
    print(f"trunk states: {timings['trunk_s']} s", flush=True)
    t = time.perf_counter()
    head = Head(trunk)
    history = train(head, states, args.steps, args.lr, log=lambda m: print(m, flush=True))
    timings["train_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    write_with_head(args.gguf, head, tok_dir, args.work, args.out)
    timings["gguf_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()  # measured on what serving loads: the written GGUF, converted, in MLX
    served = load_model(convert(args.out, args.work / "served", dtype="float32", progress=False, overwrite=True),
                        dtype="float32")
    heldout = corpus.generate("heldout", args.heldout, reasoning="lookup")
    acc = acceptance(served, tok, heldout, eos_id=eos_id)
    timings["acceptance_s"] = round(time.perf_counter() - t, 1)
    print(f"acceptance over {acc['positions'][0]} positions of {acc['conversations']} held-out conversations: "
          f"alone {acc['alone']}, chained {acc['chained']}", flush=True)

    info = {
        "command": " ".join([Path(sys.executable).name, "-m", "demo.train_mtp", *sys.argv[1:]]),
        "built": datetime.now(timezone.utc).date().isoformat(),
        "gguf": args.out.name, "gguf_bytes": args.out.stat().st_size, "gguf_sha256": _sha256(args.out),
        "parameters": (init_build or {}).get("parameters"),
        "mtp_parameters": sum(v.numel() for v in head.hf_tensors().values()),
        "shape": (init_build or {}).get("shape"), "vocab_size": tok.get_vocab_size(),
        "mtp_train": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "max_len": args.max_len,
                      "conversations": args.conversations, "seed": MTP_SEED, "loss_history": history},
        "final_loss": (init_build or {}).get("final_loss"),
        "mtp_final_loss": history[-1]["loss"], "acceptance": acc, "timings": timings,
        "init_sha256": init_sha256, "init_build": init_build,
        "software": {d: metadata.version(d) for d in ("mlx", "torch", "transformers", "tokenizers", "gguf")}
        | {"python": platform.python_version()},
        "machine": {"platform": platform.platform()},
    }
    record_path(args.out).write_text(json.dumps(info, indent=2) + "\n")
    short = summary(info) | {"mtp_acceptance": {k: acc[k] for k in ("alone", "chained")}}
    (args.out.parent / "build.json").write_text(json.dumps(short, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
