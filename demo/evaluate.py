"""Quality of the demo model on held-out synthetic conversations (entity values never seen in
training), greedy.

  python -m demo.evaluate                        # through our HTTP server (openai client)
  python -m demo.evaluate --api responses        # the same, through /v1/responses instead of chat completions
  python -m demo.evaluate --api messages         # the same, through /v1/messages (anthropic client)
  python -m demo.evaluate --via transformers --hf DIR   # in-process reference, no server
  python -m demo.evaluate --ppl --quant          # + perplexity and KLD of quantisation recipes
  python -m demo.evaluate --lookup 40 --hf DIR   # + does the model read the tool list? (teacher-forced)
  python -m demo.evaluate -n 0 --copy 200 --copy-values fixed open wild --hf DIR   # copying, by kind of value

Reported:
  tool requests   a parsable call to the right function(s) / with exactly the right arguments
  no-tool         requests answered without a tool call (small talk, declines, no tools offered)
  final answers   after the (expected) tool results, the answer contains the result's key value
  perplexity      over the assistant tokens of held-out conversations (BF16, each recipe)
  KLD             mean KL(BF16 || recipe) of the next-token distributions at those positions
  lookup          P(decline) at the reasoning's decision with the needed tool offered, and with it removed
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fixtures.ports import free_port
from model.demo import DEMO_GGUF

from . import corpus
from .corpus import NO_TOOL_KINDS, TOOL_KINDS, Sample
from .train import TrainConfig

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 256


@dataclass
class Reply:
    content: str
    reasoning: str = ""
    calls: list[dict] = field(default_factory=list)  # {"name", "arguments": dict | None (unparsable)}


# ---------------------------------------------------------------- our own parser (in-process path)

_CALL = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)</function>\s*</tool_call>", re.S)
_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def _typed(value: str, schema: dict):
    kind = schema.get("type")
    if kind == "integer":
        return int(value)
    if kind == "number":
        return float(value) if any(c in value for c in ".eE") else int(value)
    if kind == "boolean":
        if value.strip().lower() not in ("true", "false"):
            raise ValueError(value)
        return value.strip().lower() == "true"
    if kind in ("object", "array"):
        try:
            return json.loads(value)
        except ValueError:
            return ast.literal_eval(value)
    return value


def parse_reply(text: str, tools: list[dict] | None) -> Reply:
    """Split generated text (after the prompt's `<think>\\n`) into reasoning, content and calls."""
    text = text.split("<|im_end|>")[0]
    reasoning, _, rest = text.rpartition("</think>")
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}).get("properties", {}) for t in tools or []}
    calls = []
    for m in _CALL.finditer(rest):
        name, body = m[1].strip(), m[2]
        try:
            props = schemas[name]
            args = {k.strip(): _typed(v, props.get(k.strip(), {})) for k, v in _PARAM.findall(body)}
        except (KeyError, ValueError, SyntaxError):
            args = None
        calls.append({"name": name, "arguments": args})
    content = _CALL.sub("", rest).strip()
    return Reply(content, reasoning.strip(), calls)


# ---------------------------------------------------------------- backends

class TransformersBackend:
    """Greedy generation with transformers' Qwen3_5MoeForCausalLM (fp32) on an HF checkpoint."""

    name = "transformers"

    def __init__(self, hf_dir: Path, threads: int = 2):
        import torch
        from transformers import AutoTokenizer, Qwen3_5MoeForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(hf_dir)
        self.model = Qwen3_5MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.stop = [self.tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    def chat(self, messages, tools, thinking: bool) -> Reply:
        prompt = corpus.render(messages, tools, add_generation_prompt=True, enable_thinking=thinking)
        ids = self.tok.encode(prompt, add_special_tokens=False)
        with self.torch.no_grad():
            out = self.model.generate(self.torch.tensor([ids]), attention_mask=self.torch.ones(1, len(ids), dtype=int),
                                      do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=self.stop,
                                      pad_token_id=self.stop[1])
        text = self.tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=False)
        return parse_reply(text, tools)

    def logprob(self, prefix: str, tail: str) -> float:
        """log P(tail | prefix), teacher-forced."""
        a = self.tok.encode(prefix, add_special_tokens=False)
        b = self.tok.encode(prefix + tail, add_special_tokens=False)
        if b[:len(a)] != a:
            raise ValueError(f"{tail!r} does not tokenize as a continuation of the prefix")
        with self.torch.no_grad():
            logp = self.torch.log_softmax(self.model(self.torch.tensor([b])).logits[0].float(), -1)
        return sum(logp[i - 1, b[i]].item() for i in range(len(a), len(b)))

    def predictions(self, text: str) -> tuple[list[int], list[tuple[int, int]], list[int]]:
        """(token ids of text, their character spans, the greedy prediction after each), teacher-forced."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        with self.torch.no_grad():
            logits = self.model(self.torch.tensor([enc["input_ids"]])).logits[0]
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]], logits.argmax(-1).tolist()

    def close(self):
        pass


class ServerBackend:
    """`deltaserve serve MODEL` in a subprocess, queried with the openai client."""

    name = "server"

    def __init__(self, model: Path | None, startup_timeout: float = 1800, log_path: Path | None = None,
                 api: str = "chat"):
        from openai import OpenAI

        self.api = api
        self.port = free_port()
        cmd = [sys.executable, "-m", "server.cli", "serve", *([str(model)] if model else []), "--port", str(self.port),
               "--enable-auto-tool-choice", "--log-level", "warning", "--served-model-name", "demo"]
        self.log = open(log_path or os.devnull, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=HERE.parent)
        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0, timeout=600)
        deadline = time.monotonic() + startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deltaserve serve exited with {self.proc.returncode} (see {log_path})")
            try:
                self.client.models.list()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("deltaserve serve did not come up in time") from None
                time.sleep(1)

    def chat(self, messages, tools, thinking: bool) -> Reply:
        if self.api == "responses":
            return self._responses(messages, tools, thinking)
        if self.api == "messages":
            return self._messages(messages, tools, thinking)
        extra = {} if thinking else {"chat_template_kwargs": {"enable_thinking": False}}
        r = self.client.chat.completions.create(model="demo", messages=openai_messages(messages), tools=tools or None,
                                                temperature=0, max_tokens=MAX_TOKENS, extra_body=extra or None)
        m = r.choices[0].message
        calls = []
        for c in m.tool_calls or []:
            try:
                args = json.loads(c.function.arguments)
            except ValueError:
                args = None
            calls.append({"name": c.function.name, "arguments": args})
        reasoning = getattr(m, "reasoning_content", None) or (m.model_extra or {}).get("reasoning_content") or ""
        return Reply(m.content or "", reasoning, calls)

    def _responses(self, messages, tools, thinking: bool) -> Reply:
        r = self.client.responses.create(model="demo", input=responses_items(messages), temperature=0,
                                         tools=[{"type": "function", **t["function"]} for t in tools or []],
                                         max_output_tokens=MAX_TOKENS, store=False,
                                         reasoning=None if thinking else {"effort": "none"})
        reasoning, calls = "", []
        for item in r.output:
            if item.type == "reasoning":
                reasoning += "".join(c.text for c in item.content or [])
            elif item.type == "function_call":
                try:
                    args = json.loads(item.arguments)
                except ValueError:
                    args = None
                calls.append({"name": item.name, "arguments": args})
        return Reply(r.output_text, reasoning, calls)

    @functools.cached_property
    def anthropic(self):
        from anthropic import Anthropic

        return Anthropic(base_url=f"http://127.0.0.1:{self.port}", api_key="none", max_retries=0, timeout=600)

    def _messages(self, messages, tools, thinking: bool) -> Reply:
        system, conversation = anthropic_messages(messages)
        kwargs = {"system": system} if system else {}
        if tools:
            kwargs["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                                "input_schema": t["function"]["parameters"]} for t in tools]
        if not thinking:
            kwargs["thinking"] = {"type": "disabled"}
        r = self.anthropic.messages.create(model="demo", messages=conversation, max_tokens=MAX_TOKENS,
                                           extra_body={"temperature": 0}, **kwargs)  # the SDK takes no temperature
        return Reply("".join(b.text for b in r.content if b.type == "text"),
                     "".join(b.thinking for b in r.content if b.type == "thinking"),
                     [{"name": b.name, "arguments": b.input} for b in r.content if b.type == "tool_use"])

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def openai_messages(messages: list[dict]) -> list[dict]:
    """Corpus messages as a client sends them: call ids, JSON-text arguments, tool_call_id on results."""
    out, ids = [], []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            ids = [f"call_{len(out)}_{j}" for j in range(len(m["tool_calls"]))]
            m["tool_calls"] = [{"id": i, "type": "function",
                                "function": {"name": c["function"]["name"],
                                             "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                               for i, c in zip(ids, m["tool_calls"])]
        elif m["role"] == "tool":
            m["tool_call_id"] = ids.pop(0) if ids else "call_x"
        out.append(m)
    return out


def responses_items(messages: list[dict]) -> list[dict]:
    """The same conversation as Responses input items: reasoning, message, function_call and
    function_call_output items, in the order the Responses API returns and takes them."""
    items = []
    for m in openai_messages(messages):
        if m["role"] == "tool":
            items.append({"type": "function_call_output", "call_id": m["tool_call_id"], "output": m["content"]})
            continue
        if m.get("reasoning_content") is not None:
            items.append({"type": "reasoning", "summary": [],
                          "content": [{"type": "reasoning_text", "text": m["reasoning_content"]}]})
        if m["content"] or not m.get("tool_calls"):
            items.append({"type": "message", "role": m["role"], "content": m["content"]})
        items += [{"type": "function_call", "call_id": c["id"], "name": c["function"]["name"],
                   "arguments": c["function"]["arguments"]} for c in m.get("tool_calls") or []]
    return items


def anthropic_messages(messages: list[dict]) -> tuple[str | None, list[dict]]:
    """The same conversation for /v1/messages: the system prompt apart, reasoning as a thinking block,
    tool calls as tool_use blocks and each run of tool results as one user turn of tool_result blocks."""
    system, out = None, []
    for m in openai_messages(messages):
        if m["role"] == "system":
            system = m["content"]
        elif m["role"] == "tool":
            result = {"type": "tool_result", "tool_use_id": m["tool_call_id"], "content": m["content"]}
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], list):
                out[-1]["content"].append(result)
            else:
                out.append({"role": "user", "content": [result]})
        elif m["role"] == "user":
            out.append({"role": "user", "content": m["content"]})
        else:
            blocks = [{"type": "thinking", "thinking": m["reasoning_content"], "signature": ""}
                      ] if m.get("reasoning_content") is not None else []
            blocks += [{"type": "text", "text": m["content"]}] if m["content"] else []
            blocks += [{"type": "tool_use", "id": c["id"], "name": c["function"]["name"],
                        "input": json.loads(c["function"]["arguments"])} for c in m.get("tool_calls") or []]
            out.append({"role": "assistant", "content": blocks})
    return system, out


# ---------------------------------------------------------------- scoring

def _norm(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def _key(call: dict) -> str:
    return json.dumps({"name": call["name"], "arguments": _norm(call["arguments"])}, sort_keys=True)


def score_calls(reply: Reply, expected: list[dict]) -> tuple[bool, bool]:
    """(right functions, exactly right arguments); several calls compare as multisets."""
    right_fn = (all(c["arguments"] is not None for c in reply.calls)
                and Counter(c["name"] for c in reply.calls) == Counter(c["name"] for c in expected))
    exact = right_fn and Counter(map(_key, reply.calls)) == Counter(map(_key, expected))
    return right_fn, exact


def evaluate(backend, samples: list[Sample], log=print, examples: int = 3) -> dict:
    counts = defaultdict(Counter)
    failures = defaultdict(list)
    t0 = time.perf_counter()
    for i, s in enumerate(samples):
        reply = backend.chat(s.messages[:s.prompt_len], s.tools, s.enable_thinking)
        if s.kind in TOOL_KINDS:
            right_fn, exact = score_calls(reply, s.expected_calls)
            for k in ("all", s.kind, *{c["name"] for c in s.expected_calls}):
                counts[f"tool:{k}"].update(n=1, right_function=right_fn, exact_arguments=exact)
            if not exact and len(failures["tool"]) < examples:
                failures["tool"].append({"request": s.messages[s.prompt_len - 1]["content"],
                                         "expected": s.expected_calls, "got": reply.calls, "content": reply.content})
        else:
            no_call = not reply.calls
            for k in ("all", s.kind, *(["decline_missing_tool"] if s.missing else [])):
                counts[f"no_tool:{k}"].update(n=1, answered_without_call=no_call)
            if not no_call and len(failures["no_tool"]) < examples:
                failures["no_tool"].append({"request": s.messages[s.prompt_len - 1]["content"], "got": reply.calls})
        if s.result_len:
            final = backend.chat(s.messages[:s.result_len], s.tools, s.enable_thinking)
            hit = not final.calls and all(k in final.content for k in s.keys)
            for k in ("all", s.kind):
                counts[f"final:{k}"].update(n=1, contains_key_value=hit)
            if not hit and len(failures["final"]) < examples:
                failures["final"].append({"keys": s.keys, "got": final.content, "calls": final.calls})
        if (i + 1) % 25 == 0:
            log(f"  {i + 1}/{len(samples)} samples, {time.perf_counter() - t0:.0f}s")
    rates = {name: {k: (round(v / c["n"], 4) if k != "n" else v) for k, v in c.items()} for name, c in counts.items()}
    return {"backend": backend.name, "samples": len(samples), "seconds": round(time.perf_counter() - t0, 1),
            "rates": dict(sorted(rates.items())), "failures": dict(failures)}


BARS = {"tool:all": ("right_function", 0.9), "no_tool:all": ("answered_without_call", 0.9),
        "final:all": ("contains_key_value", 0.8)}


def summary_lines(result: dict) -> list[str]:
    r = result["rates"]
    lines = [f"{result['samples']} held-out conversations via {result['backend']} ({result['seconds']}s)"]

    def line(label, key, metric, bar=None):
        if key in r:
            v = r[key][metric]
            mark = "" if bar is None else ("  ok" if v >= bar else f"  BELOW {bar:.0%}")
            lines.append(f"  {label:46s} {v:7.1%}  (n={r[key]['n']}){mark}")

    line("tool requests: right function", "tool:all", "right_function", 0.9)
    line("tool requests: exactly right arguments", "tool:all", "exact_arguments", 0.7)
    line("no-tool requests: answered without a call", "no_tool:all", "answered_without_call", 0.9)
    line("final answers containing the key value", "final:all", "contains_key_value", 0.8)
    for kind in TOOL_KINDS:
        line(f"  {kind}: right function / exact", f"tool:{kind}", "exact_arguments")
    for kind in NO_TOOL_KINDS:
        line(f"  {kind}: without a call", f"no_tool:{kind}", "answered_without_call")
    line("    of the declines, those whose tool is missing", "no_tool:decline_missing_tool", "answered_without_call")
    return lines


def lookup_probe(logprob, samples: list[Sample], n: int = 40, seed: int = 0, style: str = "intent") -> dict:
    """Does the model read the tool list to choose between calling and declining? For the first n single-call
    requests, teacher-forced to the reasoning's decision (`style` "intent": 'The user wants me to <what the tool
    does>,'; "lookup": then 'Do my tools have "<name>'),
    P(decline) = the decline's share of P(call continuation) + P(decline continuation), once with the needed
    tool offered and once with it removed from the list (another tool in its place if it was the only one).
    A model that reads the list declines far more often without the tool; one that decides from the request
    alone gives both the same probability. logprob(prefix, tail) -> log P(tail | prefix)."""
    import math
    import random

    from .tools import TOOLS

    rng = random.Random(seed)
    p_decline = {"offered": [], "removed": []}
    for s in [s for s in samples if s.kind == "call"][:n]:
        name = s.expected_calls[0]["name"]
        reasoning, call, decline = corpus.intent_decision(rng, name, style)
        removed = [t for t in s.tools if t["function"]["name"] != name]
        if not removed:  # it was the only tool: another in its place
            removed = [TOOLS[rng.choice(sorted(set(TOOLS) - {name}))].definition()]
        for label, tools in (("offered", s.tools), ("removed", removed)):
            prefix = corpus.render(s.messages[:s.prompt_len], tools, add_generation_prompt=True) + reasoning
            margin = logprob(prefix, call) - logprob(prefix, decline)
            p_decline[label].append(1 / (1 + math.exp(min(margin, 700))))
    k = len(p_decline["offered"])
    return {"n": k} | {f"p_decline_{label}": round(sum(v) / max(k, 1), 4) for label, v in p_decline.items()}


def copy_probe(predictions, samples: list[Sample]) -> dict:
    """How well the model copies string arguments from the request, teacher-forced: over the calls of the
    call/multi samples, every string argument found verbatim in the request, the share of its tokens predicted
    right (the first apart from the rest, which a working copy gets from the one before; and of the rest, those
    right after a space token, which a copy has to find from the token before the space), of whole values, and
    of whole values whose end (the newline after them) is predicted too: the request goes on after most values,
    so the copy has to stop by itself. predictions(text) -> (ids, character spans, greedy prediction after each
    token)."""
    right = Counter()
    for s in samples:
        if s.kind not in ("call", "multi"):
            continue
        request = s.messages[s.prompt_len - 1]["content"]
        text = corpus.render(s.messages[:s.prompt_len + 1], s.tools, enable_thinking=s.enable_thinking)
        ids, spans, pred = predictions(text)
        pos = text.rindex("<|im_start|>assistant")
        for call in s.expected_calls:
            for key, value in call["arguments"].items():
                if not isinstance(value, str) or value not in request:
                    continue
                pos = text.index(f"<parameter={key}>\n{value}\n", pos) + len(f"<parameter={key}>\n")
                tokens = [i for i, (a, b) in enumerate(spans) if pos <= a and b <= pos + len(value) and a < b]
                if not tokens:  # (no token lies wholly inside the value)
                    continue
                hits = [pred[i - 1] == ids[i] for i in tokens]
                ends = pred[tokens[-1]] == ids[tokens[-1] + 1]  # the template's newline after the value
                spaced = [not text[slice(*spans[i - 1])].strip() for i in tokens[1:]]  # the token before: a space
                right.update(values=1, exact=all(hits), ended=all(hits) and ends, first=1, first_right=hits[0],
                             later=len(hits) - 1, later_right=sum(hits[1:]), spaced=sum(spaced),
                             spaced_right=sum(h for h, sp in zip(hits[1:], spaced) if sp))
    return {"values": right["values"],
            "exact_values": round(right["exact"] / max(right["values"], 1), 4),
            "exact_and_ended": round(right["ended"] / max(right["values"], 1), 4),
            "first_token": round(right["first_right"] / max(right["first"], 1), 4),
            "later_tokens": round(right["later_right"] / max(right["later"], 1), 4),
            "after_space": round(right["spaced_right"] / max(right["spaced"], 1), 4)}


# --copy-values: the held-out string arguments the copy probe runs on: the fixed lists' held-out values (what
# the end-to-end evaluation asks for), open values (compositions of list words) or wild ones (corpus words in
# any order), all of them held out (entities.split_of)
COPY_VALUES = {"fixed": {}, "open": {"open_values": 1.0}, "wild": {"open_values": 1.0, "wild_values": 1.0}}


def copy_samples(values: str, n: int, reasoning: str) -> list[Sample]:
    return corpus.generate("heldout", n, reasoning=reasoning, **COPY_VALUES[values])


# ---------------------------------------------------------------- perplexity and quantisation (MLX)

def heldout_rows(tokenizer, samples: list[Sample]) -> list[tuple[list[int], list[int]]]:
    from .train import encode

    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return [encode(backend, corpus.render_sample(s))[:2] for s in samples]


def mlx_logprobs(model_dir: Path, rows, dtype: str = "float32"):
    """Per row: log-softmax [T, V] (numpy float32) at the positions predicting a loss token."""
    import mlx.core as mx
    import numpy as np

    from model import load_model

    model = load_model(model_dir, dtype=dtype)
    out = []
    for ids, labels in rows:
        cache = model.make_cache(batch_size=1)
        logits = model(mx.array([ids]), cache).astype(mx.float32)[0]
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        pos = np.array([t for t in range(len(ids) - 1) if labels[t + 1] >= 0])
        tgt = np.array([labels[t + 1] for t in pos])
        out.append((np.array(logp[mx.array(pos)]), tgt))
    return out


def perplexity(logprobs) -> float:
    import numpy as np

    nll = np.concatenate([-lp[np.arange(len(t)), t] for lp, t in logprobs])
    return float(np.exp(nll.mean()))


def divergence(ref, other) -> dict:
    """How far `other`'s next-token distributions are from `ref`'s (both as mlx_logprobs returns them), as
    llama.cpp's perplexity tool reports it: mean KL(ref || other) per position, its 99th percentile and maximum,
    and the share of positions whose most likely token is the same. On a small model a few positions where
    copying is on a knife-edge can carry much of the mean; the percentile and the top-token share do not move."""
    import mlx.core as mx
    import numpy as np

    from convert.validate import position_divergence

    pairs = [position_divergence(mx.array(p), mx.array(q)) for (p, _), (q, _) in zip(ref, other)]
    per, same = np.concatenate([kl for kl, _ in pairs]), np.concatenate([s for _, s in pairs])
    return {"kld": round(float(per.mean()), 5), "kld_p99": round(float(np.quantile(per, 0.99)), 4),
            "kld_max": round(float(per.max()), 3), "same_top": round(float(same.mean()), 4)}


RECIPES = {  # name -> convert() options; "+ AWQ" and "+ weighted scales" use the imatrix
    "uniform 4-bit": dict(quantize=True, q_bits=4, q_recipe="uniform", awq=False, weighted_scales=False),
    "unsloth 4-bit": dict(quantize=True, q_bits=4, q_recipe="unsloth", awq=False, weighted_scales=False),
    "unsloth 4-bit + AWQ": dict(quantize=True, q_bits=4, q_recipe="unsloth", awq=True, weighted_scales=False),
    "unsloth 4-bit + AWQ + weighted scales": dict(quantize=True, q_bits=4, q_recipe="unsloth", awq=True,
                                                  weighted_scales=True),
}


def quant_report(gguf_path: Path, hf_dir: Path, samples: list[Sample], imatrix_samples: list[Sample],
                 work: Path, log=print) -> dict:
    from convert import convert

    from .imatrix import compute_imatrix

    work.mkdir(parents=True, exist_ok=True)
    imatrix_path = work / "imatrix.gguf"
    t = time.perf_counter()
    compute_imatrix(hf_dir, imatrix_samples, imatrix_path)
    log(f"imatrix from {len(imatrix_samples)} training conversations ({time.perf_counter() - t:.0f}s)")
    bf16_dir = convert(gguf_path, work / "bf16", dtype="bfloat16", progress=False)
    from model import load_tokenizer

    rows = heldout_rows(load_tokenizer(bf16_dir), samples)
    ref = mlx_logprobs(bf16_dir, rows)
    report = {"BF16": {"perplexity": round(perplexity(ref), 4)} | divergence(ref, ref)}
    for name, opts in RECIPES.items():
        out = convert(gguf_path, work / re.sub(r"\W+", "-", name).strip("-"), dtype="bfloat16", progress=False,
                      imatrix_path=imatrix_path if opts.get("awq") or opts.get("weighted_scales") else None, **opts)
        lp = mlx_logprobs(out, rows)
        r = report[name] = {"perplexity": round(perplexity(lp), 4)} | divergence(ref, lp)
        log(f"  {name:40s} ppl {r['perplexity']:.4f}  KLD {r['kld']:.5f} (p99 {r['kld_p99']:.4f}, max "
            f"{r['kld_max']:.3f})  same top token {r['same_top']:.2%}")
    return report


def hf_perplexity(hf_dir: Path, samples: list[Sample]) -> float:
    import numpy as np
    import torch
    from transformers import AutoTokenizer, Qwen3_5MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = Qwen3_5MoeForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    nll = []
    for ids, labels in heldout_rows(tok, samples):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
        y = torch.tensor(labels[1:])
        keep = y >= 0
        nll.append(torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="none").numpy())
    return float(np.exp(np.concatenate(nll).mean()))


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="held-out quality of the demo model")
    p.add_argument("--model", type=Path, default=None,
                   help="what the server serves (GGUF or checkpoint dir; default: the committed GGUF)")
    p.add_argument("--via", choices=["server", "transformers"], default="server")
    p.add_argument("--api", choices=["chat", "responses", "messages"], default="chat",
                   help="which of the server's APIs --via server asks: chat completions, /v1/responses or "
                        "/v1/messages (Anthropic)")
    p.add_argument("--hf", type=Path, help="HF checkpoint for --via transformers and the imatrix")
    p.add_argument("-n", type=int, default=200, help="held-out conversations (0: skip the end-to-end evaluation)")
    p.add_argument("--ppl", action="store_true", help="perplexity of the BF16 HF checkpoint (transformers)")
    p.add_argument("--quant", action="store_true", help="perplexity and KLD of the quantisation recipes (MLX)")
    p.add_argument("--quant-n", type=int, default=100, help="held-out conversations for perplexity / KLD")
    p.add_argument("--lookup", type=int, default=0, metavar="N",
                   help="also probe N held-out calls: P(decline) with the needed tool offered vs removed")
    p.add_argument("--copy", type=int, default=0, metavar="N",
                   help="teacher-forced copy accuracy of string arguments over N held-out conversations (needs --hf)")
    p.add_argument("--copy-values", nargs="+", choices=list(COPY_VALUES), default=["fixed"],
                   help="the values --copy runs on, one probe each: the fixed lists' held-out values, open or wild ones")
    p.add_argument("--work", type=Path, default=Path(".cache/demo-eval"))
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reasoning", choices=corpus.REASONING, default=TrainConfig.reasoning,
                   help="how the held-out conversations write the reasoning (as the model was trained)")
    args = p.parse_args(argv)
    if min(args.n, args.lookup, args.quant_n, args.copy) < 0:
        p.error(f"-n, --lookup, --quant-n and --copy must be 0 or more "
                f"(got {args.n}, {args.lookup}, {args.quant_n}, {args.copy})")
    for flag, given in (("--via transformers", args.via == "transformers"), ("--ppl", args.ppl),
                        ("--quant", args.quant), ("--lookup", args.lookup), ("--copy", args.copy)):
        if given and not args.hf:
            p.error(f"{flag} needs --hf DIR (an HF checkpoint of the model, run with transformers)")

    results = {}
    if args.n:  # -n 0: only the measurements asked for below
        samples = corpus.generate("heldout", args.n, reasoning=args.reasoning)
        if args.via == "server":
            model = args.model or DEMO_GGUF
            args.work.mkdir(parents=True, exist_ok=True)
            backend = ServerBackend(model, log_path=args.work / "server.log", api=args.api)
            results["model"], results["api"] = str(model), args.api
        else:
            backend = TransformersBackend(args.hf, args.threads)
            results["model"] = str(args.hf)
        try:
            results["quality"] = evaluate(backend, samples)
        finally:
            backend.close()
        print("\n".join(summary_lines(results["quality"])))
        for kind, items in results["quality"]["failures"].items():
            for item in items:
                print(f"  failure ({kind}): {json.dumps(item, ensure_ascii=False)[:400]}")
    ppl_samples = corpus.generate("heldout", args.quant_n, seed=corpus.SEEDS["heldout"] + 1,
                                  reasoning=args.reasoning)
    if args.ppl:
        results["perplexity_hf_bf16"] = round(hf_perplexity(args.hf, ppl_samples), 4)
        print(f"held-out perplexity (assistant tokens, transformers, BF16 weights): {results['perplexity_hf_bf16']}")
    if args.quant:
        imatrix_samples = corpus.generate("train", args.quant_n, seed=corpus.SEEDS["train"] + 1,
                                          reasoning=args.reasoning)
        results["quantisation"] = quant_report(args.model or DEMO_GGUF, args.hf, ppl_samples, imatrix_samples,
                                               args.work / "quant")
    if args.lookup:  # the held-out draw's first calls (a draw four times as long holds enough of them)
        lookup_samples = corpus.generate("heldout", 4 * args.lookup, reasoning=args.reasoning)
        results["lookup"] = lookup_probe(TransformersBackend(args.hf, args.threads).logprob, lookup_samples,
                                         args.lookup, style=args.reasoning)
        print(f"tool-list lookup over {results['lookup']['n']} calls, teacher-forced: P(decline) "
              f"{results['lookup']['p_decline_offered']:.3f} with the tool offered, "
              f"{results['lookup']['p_decline_removed']:.3f} with it removed")
    if args.copy:
        predictions = TransformersBackend(args.hf, args.threads).predictions
        results["copy"] = {}
        for values in dict.fromkeys(args.copy_values):
            c = results["copy"][values] = copy_probe(predictions, copy_samples(values, args.copy, args.reasoning))
            print(f"copying {c['values']} {values} string arguments from the request, teacher-forced: "
                  f"{c['exact_values']:.1%} whole values ({c['exact_and_ended']:.1%} ended there too), first tokens "
                  f"{c['first_token']:.1%}, later tokens {c['later_tokens']:.1%} "
                  f"(right after a space {c['after_space']:.1%})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
