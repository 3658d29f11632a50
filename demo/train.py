"""Train the tiny Qwen3.5 MoE demo model on the synthetic corpus with transformers' own
Qwen3_5MoeForCausalLM, on the CPU, seeded.

The loss weighs what the model generates (every assistant turn from after `<|im_start|>assistant\\n`
through its `<|im_end|>`) fully, the decisions inside it (`FOCUS_SPAN`: calling at all, which function
and parameters, each argument value; with `focus_ends` also where it ends) by `focus_weight`, and every
other token by `prompt_loss_weight`:
tool results and earlier turns repeat values from before them, so predicting them is more practice at
copying, which is what a model this small learns slowest. Batches are right-padded (the model is causal, so padding after a row's
last token cannot change that row's logits) and drawn from length buckets to waste little compute;
`procs` batches make a step, run in as many processes by `train_parallel`.

Copying (argument values from the request, result values into the answer) is what a model this
small learns last: an induction circuit forms only after a long plateau (a 2-layer Llama of the same
width does not learn to copy a random run at a varied offset in 2000 steps; the model of 2900 + 2 x 2500
steps of two batches repeats result values in 77% of its answers but gets only 32% of calls' arguments
exactly right). Options that shorten it, all off in the defaults (which rebuild the model the committed one
continues):
`induction` builds the circuit before training (`induction_init`) and `induction_lr` slows those two
layers' learning (0.1: held-out echo 1.4% -> 82%, final answers with the key value 0% -> 36%, but fewer
right tool choices end to end, 25% vs 42%); `recall_layers` starts the first GatedDeltaNet layers as
associative recall (`recall_init`), `recall_tied` keeps them so (`tie_recall`), and `copy_rows` trains
on copy drills beside each batch (`copy_drills`), whose tokens `copy_uniform` draws all alike, rare ones too
(the committed model's last two schedules). `lookup_rows` trains on lookup drills (`lookup_drills`): is a
name of random tokens on a list of them, answered with the tokens the "lookup" reasoning decides with.
The README's demo-model section has the numbers.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .tokenizer import EOS_TOKEN, PAD_TOKEN

ASSISTANT_SPAN = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.S)
# the decisions inside an assistant turn: to call (<tool_call>), which function and parameters (snake_case
# names, in the reasoning and the call), each argument's value and the "lookup" reasoning's decision (the list
# has the name, or not)
_CALL, _NAME, _PARAMETER = r"<tool_call>", r"\b[a-z]+(?:_[a-z]+)+\b", r"(?<=<parameter=)[^>]+"
_LOOKUP = r'(?<=[a-z])"(?=[,?])'
FOCUS_SPAN = re.compile("|".join([_CALL, _NAME, _PARAMETER, r"(?<=>\n)[^<]*?(?=\n</parameter>)", _LOOKUP]))
# focus_ends: each value with the newline that ends it (a copy stops there while the request goes on, mostly
# with a space token, which only the word after it decides); first, so an enum value's end is taken too
FOCUS_SPAN_ENDS = re.compile("|".join([_CALL, r"(?<=>\n)[^<]*?\n(?=</parameter>)", _NAME, _PARAMETER, _LOOKUP]))
IGNORE = -100


@dataclass
class ModelShape:
    hidden_size: int = 128
    num_hidden_layers: int = 6
    full_attention_interval: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    linear_num_key_heads: int = 2
    linear_num_value_heads: int = 4
    linear_key_head_dim: int = 32
    linear_value_head_dim: int = 32
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 128
    shared_expert_intermediate_size: int = 128
    max_position_embeddings: int = 4096


@dataclass
class TrainConfig:
    steps: int = 2900  # the length of the first learning-rate schedule (~118 min with procs=2 on two cores)
    stop_after: int = 0  # stop early at this step (0: train all `steps`)
    batch_size: int = 4
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    router_aux_loss_coef: float = 0.01
    prompt_loss_weight: float = 0.5  # weight of non-assistant tokens in the loss (assistant tokens: 1)
    focus_weight: float = 5.0  # weight of the assistant's decision tokens (FOCUS_SPAN: call, names, values)
    bucket: int = 64  # samples sorted by length within groups of this many
    seed: int = 0
    threads: int = 1  # on a shared 2-core machine a second thread mostly spins (30% system time)
    procs: int = 2  # batches per step, one per training process (train_parallel); 1 process gives the same weights
    log_every: int = 10
    recall_layers: int = 0  # the first N GatedDeltaNet layers start as associative recall (0: plain init)
    recall_log_decay: float = -6.0  # their A_log: a decay of ~0.997 per token, a memory of hundreds of tokens
    recall_tied: int = 0  # 1: keep those layers' key projection equal to the query projection all through
    copy_rows: int = 0  # copy drills per step (random runs of corpus tokens repeated at a varied offset; 0: none)
    copy_uniform: int = 0  # 1: the drills draw every token alike, rare ones too (0: by corpus frequency^0.7)
    lookup_rows: int = 0  # lookup drills per step (is a name of random tokens on a list of them? 0: none)
    missing_twins: float = 0.0  # share of single calls (with reasoning) also trained as a missing tool's decline
    focus_ends: int = 0  # 1: the focus also weighs the newline ending each argument value (FOCUS_SPAN_ENDS)
    induction: int = 0  # 1: start with a built induction circuit (induction_init; 0: plain init)
    induction_lr: float = 1.0  # learning-rate factor for the two layers induction_init builds
    induction_heads: int = 0  # key/value heads of the attention layer induction_init builds (0: all)
    induction_plain_after: int = 0  # 1: the blocks after the induction circuit keep their plain init
    reasoning: str = "intent"  # how the corpus writes the reasoning before a decision (corpus.REASONING)
    extend: int = 2500  # then schedules of this many more steps (~95 min each) on new conversations: warmup, cosine
    extend_lr: float = 2e-3  # the peak learning rate of each extension schedule
    extensions: int = 3  # how many such schedules, one after another, each on conversations no earlier one saw
    last_extend: int = 0  # the last of them this many steps instead (0: extend)
    open_values: float = 0.5  # in schedule open_from and later: share of free-text values composed afresh (Pools)
    open_from: int = 3  # the first schedule whose conversations have open values (0: the first, k: the k-th extension)
    wild_values: float = 0.0  # in schedule wild_from and later: share of open values made of corpus words (Pools)
    wild_from: int = 0  # the first schedule whose conversations have wild values (open_from or later)
    init: str = ""  # a GGUF holding the weights after the first init_schedules schedules: training starts there
    init_schedules: int = 0  # how many schedules (the first and then extensions) that GGUF's model has had
    widen_at: int = 0  # before this schedule (1 or more) the model is widened (grow.widen; 0: never)
    widen_hidden: int = 256  # the hidden size it is widened to
    widen_heads: int = 8  # and its full-attention query heads
    widen_kv_heads: int = 4  # and key/value heads (the query-per-key ratio stays)


EXTENSION_FIELDS = ("extend", "extend_lr", "extensions", "last_extend")
# newer than some saved states: the value those trained with
ADDED_FIELDS = {"focus_ends": 0, "copy_uniform": 0, "lookup_rows": 0, "missing_twins": 0.0, "open_values": 0.0, "open_from": 0, "wild_values": 0.0, "wild_from": 0, "init": "", "init_schedules": 0, "widen_at": 0,
                "widen_hidden": 256, "widen_heads": 8, "widen_kv_heads": 4, "last_extend": 0}


def extension(cfg: TrainConfig, last: bool = False) -> TrainConfig:
    """The configuration of each extension schedule: cfg.extend steps (the last: cfg.last_extend, if set)
    peaking at cfg.extend_lr, the rest as cfg."""
    steps = cfg.last_extend if last and cfg.last_extend else cfg.extend
    return replace(cfg, steps=steps, lr=cfg.extend_lr, stop_after=0, extend=0, extensions=0, last_extend=0)


def schedule_config(cfg: TrainConfig, k: int) -> TrainConfig:
    """Schedule k's configuration (0: the first, k: the k-th extension), its open_values and wild_values the
    shares its own conversations have (open_from and wild_from 0), which is what its saved state records."""
    return replace(cfg if k == 0 else extension(cfg, last=k == cfg.extensions),
                   open_values=cfg.open_values if k >= cfg.open_from else 0.0, open_from=0,
                   wild_values=cfg.wild_values if k >= cfg.wild_from else 0.0, wild_from=0)


def extension_state(k: int) -> str:
    """The file name of the k-th extension's saved state (k from 1)."""
    return "train_state_extend.pt" if k == 1 else f"train_state_extend{k}.pt"


def model_config(shape: ModelShape, vocab_size: int, eos_id: int, pad_id: int, router_aux_loss_coef: float = 0.0):
    from transformers import Qwen3_5MoeTextConfig

    s = asdict(shape)
    interval = s.pop("full_attention_interval")
    layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                   for i in range(shape.num_hidden_layers)]
    rotary = int(shape.head_dim * 0.25) // 2  # interleaved M-RoPE sections (text-only: all equal positions)
    sections = [rotary - 2 * (rotary // 3), rotary // 3, rotary // 3]
    return Qwen3_5MoeTextConfig(
        vocab_size=vocab_size, layer_types=layer_types, full_attention_interval=interval, linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6, tie_word_embeddings=False, output_router_logits=router_aux_loss_coef > 0,
        router_aux_loss_coef=router_aux_loss_coef,
        rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                         "mrope_interleaved": True, "mrope_section": sections},
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=pad_id, **s)


def recall_layers(model, n: int) -> list[int]:
    """Indices of the first n GatedDeltaNet (linear-attention) layers."""
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer, "linear_attn")][:n]


def recall_init(model, layers: int, log_decay: float) -> list[int]:
    """Initialise the first `layers` GatedDeltaNet layers as an associative memory of "what followed
    this token": the causal conv feeds the key from the previous token and the query and value from
    the current one, the key projection starts equal to the query projection, and the decay is slow.
    The delta rule then stores (previous token -> token) pairs and a query for the current token reads
    back what followed its last occurrence: the induction step, present from step 0 instead of after
    a plateau. Everything stays trainable. Returns the layer indices it initialised."""
    import torch

    done = recall_layers(model, layers)
    with torch.no_grad():
        for i in done:
            _gdn_taps(model.model.layers[i].linear_attn, query=0, key=1, value=0, log_decay=log_decay)
    return done


def _gdn_taps(gdn, query: int, key: int, value: int, log_decay: float) -> None:
    """Feed a GatedDeltaNet's query, key and value from one position each (0: this token, 1: the previous
    one) through its causal conv, start its key projection equal to its query projection, set its decay.
    Call under torch.no_grad()."""
    import torch

    kd, k = gdn.key_dim, gdn.conv_kernel_size
    w = torch.zeros_like(gdn.conv1d.weight)  # [channels, 1, kernel]; tap k-1 is the current token
    w[:kd, 0, k - 1 - query] = 1.0
    w[kd:2 * kd, 0, k - 1 - key] = 1.0
    w[2 * kd:, 0, k - 1 - value] = 1.0
    gdn.conv1d.weight.copy_(w)
    gdn.in_proj_qkv.weight[kd:2 * kd] = gdn.in_proj_qkv.weight[:kd]
    gdn.A_log.fill_(log_decay)


def induction_layers(model) -> tuple[int, int]:
    """(writer, reader) of induction_init: the first GatedDeltaNet layer and the first full-attention layer after it."""
    writer = recall_layers(model, 1)[0]
    return writer, next(i for i, layer in enumerate(model.model.layers) if hasattr(layer, "self_attn") and i > writer)


def induction_init(model, token_dims: int = 64, gate: float = 0.5, log_decay: float = 2.0, qk_scale: float = 3.0,
                   ov_scale: float = 8.0, readout_scale: float = 10.0, kv_heads: int = 0,
                   plain_after: bool = False) -> list[int]:
    """Start the model with a working induction circuit (copy what followed the current token's last occurrence),
    built from two layers, instead of waiting for one to form after a plateau longer than the training budget.

    The residual stream is laid out in three parts: the token embedding in the first `token_dims` dimensions,
    the previous token in the rest but one, a constant in the last. The first GatedDeltaNet layer writes the
    previous token: its conv feeds the value from the previous position and query and key (equal projections)
    from the current one, its decay forgets everything at once, so its output is the previous token's value,
    gated by the constant. The first full-attention layer matches: each query reads the current token (a random
    projection of its embedding, on the dimensions RoPE leaves alone), each key reads the previous-token part,
    its projection solved by least squares so a key equals the query the same token makes; the values copy the
    matched position's token embedding back into the token part, which the LM head (started as the embedding)
    reads as that token. Every other layer starts with a zero output projection (an identity block), so the
    residual holds nothing else at step 0. `kv_heads` builds only the first key/value heads of the attention
    layer (their query heads with them) and leaves the others as initialised. `plain_after` keeps the plain init
    of the blocks after the attention layer (they do not feed the circuit). Everything stays trainable.
    Returns the two layer indices."""
    import torch
    import torch.nn.functional as F

    cfg = model.config
    hidden = cfg.hidden_size
    tok, prev = slice(0, token_dims), slice(token_dims, hidden - 1)
    layers = model.model.layers
    writer, reader = induction_layers(model)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.zero_()
        emb[:, tok] = torch.randn(emb.shape[0], token_dims) / token_dims ** 0.5
        emb[:, -1] = 1.0
        for layer in layers[:reader + 1] if plain_after else layers:
            block = layer.linear_attn.out_proj if hasattr(layer, "linear_attn") else layer.self_attn.o_proj
            block.weight.zero_()
            for name, p in layer.mlp.named_parameters():
                if "down_proj" in name:
                    p.zero_()

        gdn = layers[writer].linear_attn
        kd = gdn.key_dim
        gdn.in_proj_qkv.weight[:, token_dims:] = 0
        _gdn_taps(gdn, query=0, key=0, value=1, log_decay=log_decay)
        gdn.in_proj_a.weight.zero_()
        gdn.in_proj_z.weight.zero_()
        gdn.in_proj_z.weight[:, -1] = gate
        gdn.out_proj.weight[prev] = torch.linalg.qr(torch.randn(gdn.value_dim, hidden - 1 - token_dims))[0].T
        # what the writer puts in the residual for each token as the previous one (beta and q.k are per-head
        # scalars there, which the gated norm removes)
        x = layers[writer].input_layernorm(emb)
        n = emb.shape[0]
        v = F.silu(x @ gdn.in_proj_qkv.weight[2 * kd:].T).view(n, -1, gdn.head_v_dim)
        z = (x @ gdn.in_proj_z.weight.T).view(n, -1, gdn.head_v_dim)
        written = gdn.out_proj(gdn.norm(v, z).reshape(n, -1))[:, prev]

        att = layers[reader].self_attn
        hd, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        rot = int(hd * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
        built = kv_heads or kv  # the other key/value heads (and their query heads) keep their random init
        group, vdim = heads // kv, min(hd, token_dims // built)
        att.k_proj.weight[:built * hd] = 0
        att.v_proj.weight[:built * hd] = 0
        att.q_proj.weight[:built * group * 2 * hd] = 0  # the gate half too: sigmoid(0) passes half of every head
        basis = torch.linalg.qr(torch.randn(token_dims, token_dims))[0]
        gram = written.T @ written + 1e-3 * torch.eye(written.shape[1])
        for h in range(built):
            a = torch.randn(hd - rot, token_dims) / token_dims ** 0.5
            att.k_proj.weight[h * hd + rot:(h + 1) * hd, prev] = torch.linalg.solve(gram, written.T @ (emb[:, tok] @ a.T)).T
            b = basis[:, h * vdim:(h + 1) * vdim].T
            att.v_proj.weight[h * hd:h * hd + vdim, tok] = b
            for j in range(h * group, (h + 1) * group):
                att.q_proj.weight[2 * j * hd + rot:(2 * j + 1) * hd, tok] = a
                att.o_proj.weight[tok, j * hd:j * hd + vdim] = b.T * ov_scale * kv / (built * group)
        att.q_norm.weight.fill_(qk_scale - 1)
        att.k_norm.weight.fill_(qk_scale - 1)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, tok] = emb[:, tok] * readout_scale
    return [writer, reader]


def tie_recall(model, layers: list[int]) -> None:
    """Set the key projection of these GatedDeltaNet layers to the mean of key and query projections, and
    the query projection to the same: a projected-gradient step that keeps them an associative memory."""
    import torch

    with torch.no_grad():
        for i in layers:
            gdn = model.model.layers[i].linear_attn
            w, kd = gdn.in_proj_qkv.weight, gdn.key_dim
            mean = (w[:kd] + w[kd:2 * kd]) / 2
            w[:kd] = mean
            w[kd:2 * kd] = mean


def encode(tok, text: str, ends: bool = False) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels (IGNORE outside the assistant turns) and a focus flag (1 on the assistant
    tokens FOCUS_SPAN marks, or with `ends` FOCUS_SPAN_ENDS, 0 elsewhere). tok: a tokenizers.Tokenizer."""
    enc = tok.encode(text, add_special_tokens=False)
    spans = [m.span(1) for m in ASSISTANT_SPAN.finditer(text)]
    pattern = FOCUS_SPAN_ENDS if ends else FOCUS_SPAN
    focus_spans = [m.span() for a, b in spans for m in pattern.finditer(text, a, b)]
    labels, focus, j, k = [], [], 0, 0
    for tid, (start, _) in zip(enc.ids, enc.offsets):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        while k < len(focus_spans) and start >= focus_spans[k][1]:
            k += 1
        inside = j < len(spans) and spans[j][0] <= start < spans[j][1]
        labels.append(tid if inside else IGNORE)
        focus.append(int(inside and k < len(focus_spans) and focus_spans[k][0] <= start))
    return enc.ids, labels, focus


def batches(rows: list[tuple[list[int], list[int], list[int]]], cfg: TrainConfig, pad_id: int, rng: random.Random):
    """[B, T] input ids, labels and focus flags: rows bucketed by length, buckets and batches shuffled;
    each run of cfg.procs batches (one step) comes from one bucket, so the processes of a step get
    batches of about the same length."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    out = []
    for g in range(0, len(order), cfg.bucket):
        group = sorted(order[g:g + cfg.bucket], key=lambda i: len(rows[i][0]))
        for b in range(0, len(group) - cfg.batch_size + 1, cfg.batch_size):
            out.append(group[b:b + cfg.batch_size])
    steps = [out[i:i + cfg.procs] for i in range(0, len(out) - cfg.procs + 1, cfg.procs)]
    rng.shuffle(steps)  # with procs=1 the same permutation as shuffling the batches themselves
    for idx in (batch for step in steps for batch in step):
        width = max(len(rows[i][0]) for i in idx)
        ids = np.full((len(idx), width), pad_id, dtype=np.int64)
        labels = np.full((len(idx), width), IGNORE, dtype=np.int64)
        focus = np.zeros((len(idx), width), dtype=np.float32)
        for r, i in enumerate(idx):
            x, y, f = rows[i]
            ids[r, :len(x)] = x
            labels[r, :len(y)] = y
            focus[r, :len(f)] = f
        yield ids, labels, focus


def lm_loss(logits, ids, labels, pad_id: int, prompt_weight: float, focus=None, focus_weight: float = 1.0):
    """Next-token cross-entropy, weight 1 on assistant tokens (labels >= 0), `focus_weight` on those
    of them `focus` flags, `prompt_weight` on the other real tokens, 0 on padding; normalised by the
    total weight."""
    import torch

    target = ids[:, 1:]
    weight = torch.where(labels[:, 1:] >= 0, 1.0, prompt_weight * (target != pad_id).float())
    if focus is not None and focus_weight != 1.0:
        weight = torch.where(focus[:, 1:] > 0, focus_weight, weight)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), reduction="none")
    return (ce * weight.flatten()).sum() / weight.sum()


def _drill_probs(counts: np.ndarray, uniform: bool) -> np.ndarray:
    """The drills' token distribution: every token of a count of 0 or more alike (uniform), or by count^0.7."""
    probs = (counts >= 0).astype(np.float64) if uniform else np.maximum(counts, 0).astype(np.float64) ** 0.7
    return probs / probs.sum()


def copy_drills(counts: np.ndarray, n: int, rng: np.random.Generator, uniform: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """[n, T] ids and labels of copy drills: a random prefix (0-16 tokens), a run A (12-36 tokens), a
    separator, A again; tokens drawn by corpus frequency^0.7 (uniform: every token of a count of 0 or more
    alike), one shape per call. Labels only on the copy."""
    # by frequency, tokens the corpus never uses stay out; uniformly, those of a negative count (special ones)
    probs = _drill_probs(counts, uniform)
    length, prefix = int(rng.integers(12, 37)), int(rng.integers(0, 17))
    body = rng.choice(len(probs), size=(n, prefix + length + 1), p=probs)
    sep = int(np.argmax(counts))  # the corpus' most common token stands between the run and its copy
    body[:, prefix + length] = sep
    ids = np.concatenate([body, body[:, prefix:prefix + length]], axis=1)
    labels = np.full_like(ids, IGNORE)
    labels[:, prefix + length + 1:] = ids[:, prefix + length + 1:]
    return ids, labels


def lookup_drills(counts: np.ndarray, n: int, rng: np.random.Generator, quote: int, listed: int,
                  unlisted: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, T] ids and labels of lookup drills, the "lookup" reasoning's decision on random names: a list of 2-6
    names of 2-3 tokens, each written `quote name listed` and 0-8 more tokens (as a tool list writes
    '"get_weather", "description": ...'), then 4 names asked about, each `quote name` followed by `listed` when
    it is on the list and by `unlisted` when not (half each; an unlisted one ends in a listed one's last token
    half the time, so only the whole name tells). Tokens drawn as copy_drills(uniform=True) draws them, one
    shape per call. Labels only on the answers."""
    probs = _drill_probs(counts, uniform=True)
    k, width, filler, asked = int(rng.integers(2, 7)), int(rng.integers(2, 4)), int(rng.integers(0, 9)), 4
    names = rng.choice(len(probs), size=(n, k, width), p=probs)
    col = lambda v: np.full((n, 1), v)  # noqa: E731
    parts = []
    for i in range(k):
        parts += [col(quote), names[:, i], col(listed), rng.choice(len(probs), size=(n, filler), p=probs)]
    on_list = rng.random((n, asked)) < 0.5
    which = names[np.arange(n)[:, None], rng.integers(0, k, (n, asked))]  # [n, asked, width]
    fresh = rng.choice(len(probs), size=(n, asked, width), p=probs)
    fresh[..., -1] = np.where(rng.random((n, asked)) < 0.5, which[..., -1], fresh[..., -1])
    query = np.where(on_list[..., None], which, fresh)
    on_list = (query[:, :, None] == names[:, None]).all(-1).any(-1)  # a fresh name may be a listed one by chance
    answers = []
    for j in range(asked):
        answer = np.where(on_list[:, j:j + 1], listed, unlisted)
        parts += [col(quote), query[:, j], answer]
        answers.append(sum(p.shape[1] for p in parts) - 1)
    ids = np.concatenate(parts, axis=1)
    labels = np.full_like(ids, IGNORE)
    labels[:, answers] = ids[:, answers]
    return ids, labels


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, rows, cfg: TrainConfig, pad_id: int, log=print, state_path: Path | None = None,
          save_every: int = 25, lookup_tokens: tuple[int, ...] = ()) -> dict:
    """AdamW with warmup and cosine decay for cfg.steps steps. With state_path, the model, optimiser
    and progress are saved every `save_every` steps and a rerun resumes from there, giving the same
    weights as an uninterrupted run (the batch order is replayed from the seed). Each step takes cfg.procs
    batches; in a process group (train_parallel) each process runs its share of them and their gradients
    are summed across processes, alone it runs them all. lookup_tokens: the (quote, listed, unlisted) token ids
    of the lookup drills (cfg.lookup_rows)."""
    import torch
    import torch.distributed as dist

    rng = random.Random(cfg.seed)
    built = set()
    if cfg.induction:  # the layers induction_init built
        writer, reader = induction_layers(model)
        built = {f"model.layers.{writer}.linear_attn.", f"model.layers.{reader}.self_attn."}
    groups = {}
    for n, p in model.named_parameters():
        decays = p.ndim >= 2 and "embed" not in n
        factor = cfg.induction_lr if any(n.startswith(b) for b in built) else 1.0
        groups.setdefault((decays, factor), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0, "lr_factor": factor}
                             for (decays, factor), ps in sorted(groups.items())],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    step, tokens, history, done_s = 0, 0, [], 0.0
    if state_path is not None and Path(state_path).is_file():
        state = torch.load(state_path, weights_only=False)
        same = {k: v for k, v in asdict(cfg).items() if k not in ("stop_after", "log_every", *EXTENSION_FIELDS)}
        saved = ADDED_FIELDS | state["config"]
        if {k: saved[k] for k in same} != same:
            raise ValueError(f"{state_path} was saved by another training configuration; remove it to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, tokens, history, done_s = state["step"], state["tokens"], state["history"], state["seconds"]
        log(f"resuming at step {step} from {state_path}")
    tied = recall_layers(model, cfg.recall_layers) if cfg.recall_tied else []
    if cfg.lookup_rows and len(lookup_tokens) != 3:
        raise ValueError("lookup drills need their (quote, listed, unlisted) token ids")
    if cfg.copy_rows or cfg.lookup_rows:  # the drills draw their tokens by corpus frequency, or all alike but the special ones
        counts = np.bincount(np.concatenate([np.asarray(r[0]) for r in rows]), minlength=model.config.vocab_size)
        counts[min(pad_id, model.config.eos_token_id):] = -1  # the added tokens follow the learned ones (train_bpe)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if cfg.procs % world:
        raise ValueError(f"procs={cfg.procs} batches per step cannot be split over {world} processes")
    model.train()
    t0 = time.perf_counter() - done_s
    seen = 0
    last = cfg.stop_after or cfg.steps
    while step < last:
        stream = batches(rows, cfg, pad_id, rng)
        for chunk in zip(*[stream] * cfg.procs):  # cfg.procs consecutive batches make one step
            if step >= last:
                break
            seen += 1
            if seen <= step:
                continue  # replaying the batch order up to a resumed step
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg) * group["lr_factor"]
            sums = np.zeros(3)  # this process' share of: loss, aux loss, tokens
            for ids, labels, focus in chunk[rank::world]:
                x = torch.from_numpy(ids)
                out = model(input_ids=x, use_cache=False)
                loss = lm_loss(out.logits, x, torch.from_numpy(labels), pad_id, cfg.prompt_loss_weight,
                               torch.from_numpy(focus), cfg.focus_weight)
                drills = []
                if cfg.copy_rows:
                    drills.append(copy_drills(counts, cfg.copy_rows, np.random.default_rng([cfg.seed, step, rank]),
                                              bool(cfg.copy_uniform)))
                if cfg.lookup_rows:
                    drills.append(lookup_drills(counts, cfg.lookup_rows,
                                                np.random.default_rng([cfg.seed, step, rank, 1]), *lookup_tokens))
                for d_ids, d_labels in drills:  # loss on the drills' labels alone
                    d = torch.from_numpy(d_ids)
                    loss = loss + lm_loss(model(input_ids=d, use_cache=False).logits, d, torch.from_numpy(d_labels),
                                          pad_id, 0.0)
                aux = getattr(out, "aux_loss", None)
                if aux is not None:
                    loss = loss + cfg.router_aux_loss_coef * aux
                (loss / cfg.procs).backward()
                sums += [loss.item(), 0.0 if aux is None else aux.item(), ids.size]
            if world > 1:
                sums = _sum_over_processes(model, sums)
            loss_mean, aux_mean = float(sums[0]) / cfg.procs, (None if aux is None else float(sums[1]) / cfg.procs)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            tie_recall(model, tied)
            opt.zero_grad(set_to_none=True)
            tokens += int(sums[2])
            step += 1
            if step % cfg.log_every == 0 or step == last:
                elapsed = time.perf_counter() - t0
                entry = {"step": step, "loss": round(loss_mean, 4), "lr": round(lr_at(step - 1, cfg), 6),
                         "aux": None if aux_mean is None else round(aux_mean, 4),
                         "tokens": tokens, "elapsed_s": round(elapsed, 1), "tok_per_s": round(tokens / elapsed)}
                history.append(entry)
                log(json.dumps(entry))
            if rank == 0 and state_path is not None and (step % save_every == 0 or step == last):
                tmp = Path(f"{state_path}.tmp")
                torch.save({"config": asdict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "step": step, "tokens": tokens, "history": history,
                            "seconds": time.perf_counter() - t0}, tmp)
                tmp.replace(state_path)
    model.eval()
    return {"steps": step, "tokens": tokens, "seconds": round(time.perf_counter() - t0, 1), "history": history}


def _sum_over_processes(model, sums: np.ndarray) -> np.ndarray:
    """Sum every parameter's gradient (zeros where this process' batches left it unused, such as an
    expert no token chose) and the logged sums over the process group, in one all-reduce."""
    import torch
    import torch.distributed as dist

    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.flatten() for p in params] + [torch.tensor(sums, dtype=torch.float32)])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return flat[offset:].double().numpy()


def _exit_with_parent() -> None:
    """End this process when the one that spawned it is gone (killed, not just interrupted)."""
    import os
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _train_process(rank: int, port: int, config, weights: dict, rows, cfg: TrainConfig, pad_id: int, state_path: Path,
                   save_every: int, lookup_tokens: tuple[int, ...]):
    import os

    import torch
    import torch.distributed as dist
    from transformers import Qwen3_5MoeForCausalLM

    _exit_with_parent()
    torch.set_num_threads(cfg.threads)
    if cfg.threads == 1 and hasattr(os, "sched_setaffinity"):  # a core of its own
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[rank % len(cores)]})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cfg.procs)
    try:
        model = Qwen3_5MoeForCausalLM(config).float()  # a model of its own (a copied one loses its router-logit hooks)
        model.load_state_dict(weights)
        train(model, rows, cfg, pad_id, log=print if rank == 0 else (lambda _: None), state_path=state_path,
              save_every=save_every, lookup_tokens=lookup_tokens)
    finally:
        dist.destroy_process_group()


def train_parallel(model, rows, cfg: TrainConfig, pad_id: int, state_path: Path, log=print, save_every: int = 25,
                   lookup_tokens: tuple[int, ...] = ()) -> dict:
    """train() in cfg.procs processes, a core each (one batch of each step apiece, gradients summed with
    gloo): the same weights as one process running all of each step's batches, faster (two processes on
    a 2-core machine: 1.33x). The first process saves the state; this one then loads the final weights
    from it."""
    import socket

    import torch.multiprocessing as mp

    if cfg.procs > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_train_process, args=(port, model.config, model.state_dict(), rows, cfg, pad_id, state_path,
                                       save_every, lookup_tokens), nprocs=cfg.procs)
    return train(model, rows, cfg, pad_id, log=log, state_path=state_path, save_every=save_every,
                 lookup_tokens=lookup_tokens)


def save_checkpoint(model, tokenizer_dir: Path, out_dir: Path) -> None:
    """bf16 safetensors + config + generation config + the tokenizer files: an HF checkpoint directory."""
    import shutil

    import torch

    out_dir = Path(out_dir)
    model.config.architectures = ["Qwen3_5MoeForCausalLM"]
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out_dir)
    model.to(torch.float32)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)
    gen = json.loads((out_dir / "generation_config.json").read_text()) if (out_dir / "generation_config.json").exists() else {}
    gen.update({"eos_token_id": [model.config.eos_token_id, model.config.pad_token_id],
                "pad_token_id": model.config.pad_token_id, "do_sample": False})
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def token_ids(tok) -> tuple[int, int]:
    return tok.token_to_id(EOS_TOKEN), tok.token_to_id(PAD_TOKEN)
