"""Synthetic tool-use conversations, rendered with the real Qwen3.5 chat template.

`generate(split, n, seed)` returns `Sample`s: OpenAI-style messages (assistant tool calls with
arguments as objects, tool results as JSON text), the tools offered, and what an evaluation
checks (the expected calls, the value a final answer must repeat). Kinds:

  call     one tool call, its result, a final answer that uses it
  multi    two calls in one turn (same tool twice, or two tools), both results, one answer
  error    one call whose tool reports an error; the answer passes the error on
  direct   tools are offered but the request needs none (greetings, small talk, echoes)
  decline  no offered tool can serve the request (an action no tool does, or a missing tool)
  chat     no tools at all: small talk answered, tool-type requests declined

CLI: python -m demo.corpus [--split heldout] [-n 3] [--seed 0] [--reasoning intent]  (prints rendered samples)
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from functools import cache

from .entities import Pools
from .tools import TOOLS, Call, ToolSpec, pick, request_for

KINDS = {"call": 0.45, "multi": 0.12, "error": 0.03, "direct": 0.14, "decline": 0.14, "chat": 0.12}
TOOL_KINDS = ("call", "multi", "error")
NO_TOOL_KINDS = ("direct", "decline", "chat")
P_NO_THINKING = 0.2
P_HISTORY = 0.8  # earlier exchanges: more assistant tokens per system prompt
MAX_HISTORY = 4
P_KEEP_REASONING = 0.7  # clients may or may not send reasoning_content back with a tool-call turn
SEEDS = {"train": 1234, "heldout": 98765}  # different seeds and disjoint entity pools
OPEN_SEED = 4321  # the training conversations with open values (build: the schedules from open_from on)
WILD_SEED = 8642  # those with wild values too (build: the schedules from wild_from on)
WORD_SOURCE = 300  # corpus_words reads this many training conversations

SYSTEM_TEXTS = ["", "", "", "You are a helpful assistant.", "You are a concise assistant. Keep answers short.",
                "You help users with everyday tasks.", "Be friendly and precise.", "Answer in English."]


@dataclass
class Sample:
    kind: str
    messages: list[dict]
    tools: list[dict] | None
    enable_thinking: bool
    prompt_len: int  # messages[:prompt_len] is the request the model must answer first
    expected_calls: list[dict] = field(default_factory=list)  # [{"name", "arguments"}]
    result_len: int = 0  # messages[:result_len] ends with the tool results (0: no second step)
    keys: list[str] = field(default_factory=list)  # values the final answer must contain
    missing: str = ""  # a decline's tool that the request needs and the list lacks ("": an unservable request)

    def to_json(self) -> dict:
        return self.__dict__

    @classmethod
    def from_json(cls, d: dict) -> "Sample":
        return cls(**d)


# ---------------------------------------------------------------- answers that need no tool

JOKES = ["Why did the scarecrow win an award? Because he was outstanding in his field.",
         "I told my computer a joke about UDP. I'm not sure it got it.",
         "Why don't skeletons fight each other? They don't have the guts.",
         "What do you call a fake noodle? An impasta.",
         "Why did the math book look sad? It had too many problems."]


def _direct(rng: random.Random, pools: Pools, caps: list[str]) -> tuple[str, str, str]:
    """(request, reasoning, answer) for small talk the model answers itself."""
    kind = pick(rng, ["greet", "thanks", "caps", "who", "echo", "echo", "list", "name", "name", "joke", "count", "how"])
    if kind == "greet":
        return (pick(rng, ["Hi!", "Hello there.", "Good morning!", "Hey!", "Hello, anyone there?", "hi"]),
                "The user is greeting me. No tool is needed.",
                pick(rng, ["Hello! How can I help you today?", "Hi there! What can I do for you?"]))
    if kind == "thanks":
        return (pick(rng, ["Thanks, that's all.", "Great, thank you!", "Perfect, thanks a lot.", "thx"]),
                "The user is thanking me. I can reply directly.",
                pick(rng, ["You're welcome! Let me know if you need anything else.", "Happy to help!"]))
    if kind == "caps":
        text = (f"I can {_join(caps)}." if caps else "I have no tools right now, so I can only chat.")
        return (pick(rng, ["What can you do?", "Which tools do you have?", "What are you able to help with?"]),
                "The user asks what I can do. I'll list my tools.", text)
    if kind == "who":
        return (pick(rng, ["Who are you?", "What's your name?", "Are you a bot?"]),
                "The user asks who I am. No tool is needed.",
                "I'm a small demo assistant served by deltaserve.")
    if kind == "echo":
        phrase = pick(rng, pools.bodies + pools.subjects + pools.tasks)
        return (pick(rng, ['Repeat after me: "{p}"', 'Say "{p}" back to me.', 'Please echo this: {p}']).format(p=phrase),
                "The user wants me to repeat a sentence. No tool is needed.", phrase)
    if kind == "list":
        items = [pick(rng, [pools.city, pools.first_name, pools.ticker, pools.email])(rng) for _ in range(rng.randint(2, 4))]
        return (pick(rng, ["Repeat these: {l}.", "Say back this list: {l}.", "Echo: {l}"]).format(l=_join(items)),
                "The user wants me to repeat a list. No tool is needed.", _join(items) + ".")
    if kind == "name":
        name = pools.first_name(rng)
        return (pick(rng, ["My name is {n}. Nice to meet you!", "Hi, I'm {n}.", "Call me {n}."]).format(n=name),
                f"The user introduces themselves as {name}. No tool is needed.",
                pick(rng, ["Nice to meet you, {n}! How can I help?", "Hello {n}! What can I do for you?"]).format(n=name))
    if kind == "joke":
        return (pick(rng, ["Tell me a joke.", "Make me laugh.", "Do you know any jokes?"]),
                "The user wants a joke. No tool is needed.", pick(rng, JOKES))
    if kind == "count":
        n = rng.randint(3, 10)
        return (pick(rng, ["Count from 1 to {n}.", "Count to {n}, please.", "Can you count up to {n}?"]).format(n=n),
                f"The user wants me to count to {n}. No tool is needed.",
                ", ".join(str(i) for i in range(1, n + 1)) + ".")
    return (pick(rng, ["How are you?", "How's it going?", "How are you doing today?"]),
            "Small talk. I can answer directly.",
            pick(rng, ["I'm doing well, thanks for asking! How can I help?", "All good here! What do you need?"]))


# (request, what the user wants done) for actions no tool in the catalogue can do
UNSERVABLE = [
    ("Order a large pepperoni pizza to my flat.", "order food"),
    ("Book me a taxi to the airport at {time}.", "book taxis"),
    ("Turn off the lights in the living room.", "control the lights"),
    ("Pay my electricity bill.", "pay bills"),
    ("Call {name} on the phone.", "make phone calls"),
    ("Text {name} that I'm running late.", "send text messages"),
    ("Buy {n} shares of {ticker}.", "trade stocks"),
    ("Set the thermostat to {n} degrees.", "control the thermostat"),
    ("Open the garage door.", "open doors"),
    ('Post a tweet saying "{body}"', "post on social media"),
    ("Transfer {n}00 EUR to {name}.", "make payments"),
    ("Cancel my flight to {city}.", "cancel bookings"),
    ("Start the washing machine.", "control appliances"),
    ("Print this document twice.", "print documents"),
    ("Take a photo of the whiteboard.", "take photos"),
    ("Delete all my e-mails from {name}.", "delete e-mails"),
    ("Order new printer ink.", "place orders"),
    ("Lock the front door.", "lock doors"),
    ("Rent a car in {city} for tomorrow.", "rent cars"),
    ("Sign me up for the gym.", "sign you up for things"),
]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _unservable(rng: random.Random, pools: Pools) -> tuple[str, str]:
    request, action = pick(rng, UNSERVABLE)
    return request.format(time=f"{rng.randint(5, 22):02d}:{pick(rng, ['00', '15', '30', '45'])}",
                          name=pools.first_name(rng), n=rng.randint(2, 30), ticker=pools.ticker(rng),
                          body=pools.body(rng), city=pools.city(rng)), action


def _decline_text(rng: random.Random, action: str, caps: list[str]) -> str:
    can = f" I can {_join(caps)}." if caps else ""
    return pick(rng, ["Sorry, I can't {a}: none of my tools can do that.{c}",
                      "I'm afraid I can't {a} with the tools I have.{c}",
                      "Unfortunately I'm not able to {a}.{c}"]).format(a=action, c=can)


# ---------------------------------------------------------------- assembling conversations

def _call_message(reasoning: str, calls: list[Call]) -> dict:
    return {"role": "assistant", "content": "", "reasoning_content": reasoning,
            "tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]}


def _result_messages(calls: list[Call], results: list[dict]) -> list[dict]:
    return [{"role": "tool", "content": json.dumps(r, ensure_ascii=False)} for c, r in zip(calls, results)]


def _intent(name: str) -> str:
    """What a tool does, from its description as the tool list shows it: "get the current weather for a city"."""
    d = TOOLS[name].description
    return d[0].lower() + d[1:]


# How the reasoning before a call or a decline is written (`generate(reasoning=...)`):
#   "topic"   the request restated with its values, then the decision ("The user wants the weather in Oslo.
#             I'll call get_weather."); the committed demo model was trained on this
#   "intent"  what the request needs in the tool list's own words, then the decision; no values, so a failed
#             copy cannot derail the tool choice, and calls and declines share the openers, so choosing one
#             decides nothing: the outcome turns on whether the tool list has the tool
#   "lookup"  intent, and where the request needs a tool, its name looked up in the list before deciding:
#             'Do my tools have "get_weather' goes on as the list goes on after that name when the tool is there
#             ('", "description": "Get the current weather for a city". Yes, ...'), so a model that copies can
#             continue it from the list itself, and with '"? No, ...' when it is not
REASONING = ("topic", "intent", "lookup")
_INTENT = [("The user wants me to {d}.", " I'll call {n}.", " None of the available tools can do that.",
            " I have no tools in this conversation."),
           ("The user is asking me to {d},", " so I should use {n}.", " but none of the available tools can do that.",
            " but I have no tools in this conversation."),
           ("I need to {d},", " so I'll use {n}.", " but none of the available tools can.", " but I have no tools here."),
           ("This needs a tool that can {d}:", " {n}.", " none of the available tools can.", " I have no tools here.")]
OUTCOMES = ("call", "decline", "no_tools")


def _lookup(opener: str, need: str, name: str) -> tuple[str, str, str]:
    """The "lookup" reasoning for `name`: (the opener as a sentence and the look at the tool list, up to the
    decision; how it goes on when the list has the tool, as the list itself goes on after the name; how it goes
    on when the list lacks it)."""
    return (opener.format(d=need)[:-1] + f'. Do my tools have "{name}',
            f'", "description": "{TOOLS[name].description}". Yes, so I\'ll call {name}.',
            '"? No, so none of the available tools can do that.')


def _intent_reasoning(rng: random.Random, need: str, outcome: str, name: str = "", style: str = "intent") -> str:
    opener, *tails = pick(rng, _INTENT)
    if style == "lookup" and name:  # a call, or a decline for a missing tool: the name looked up first
        head, offered, lacked = _lookup(opener, need, name)
        return head + (offered if outcome == "call" else lacked)
    return (opener + tails[OUTCOMES.index(outcome)]).format(d=need, n=name)


def intent_decision(rng: random.Random, name: str, style: str = "intent") -> tuple[str, str, str]:
    """For a request that needs tool `name`, with a random opener: (the intent or lookup reasoning up to its
    decision, how it goes on when the list offers the tool, how it goes on when the list lacks it)."""
    opener, call, decline, _ = pick(rng, _INTENT)
    if style == "lookup":
        return _lookup(opener, _intent(name), name)
    return opener.format(d=_intent(name)), call.format(n=name), decline


def _call_reasoning(rng: random.Random, calls: list[Call], style: str) -> str:
    if style != "topic":
        if len(calls) == 1:
            return _intent_reasoning(rng, _intent(calls[0].name), "call", calls[0].name, style)
        if calls[0].name == calls[1].name:
            return f"The user wants me to {_intent(calls[0].name)} twice. I'll call {calls[0].name} twice."
        return (f"The user wants me to {_intent(calls[0].name)} and to {_intent(calls[1].name)}. "
                f"I'll call {calls[0].name} and {calls[1].name}.")
    if len(calls) == 1:
        c = calls[0]
        return pick(rng, ["The user wants {t}. I'll call {n}.", "The user is asking for {t}, so I should use {n}.",
                          "I need {n} for {t}.", "{n} can get {t}."]).format(t=c.topic, n=c.name)
    names = calls[0].name if calls[0].name == calls[1].name else f"{calls[0].name} and {calls[1].name}"
    twice = " twice" if calls[0].name == calls[1].name else ""
    return f"The user wants {calls[0].topic} and {calls[1].topic}. I'll call {names}{twice}."


def _answer_reasoning(rng: random.Random, calls: list[Call]) -> str:
    return pick(rng, ["{n} returned the result.", "I have the result from {n}.", "The result is in; I'll answer.",
                      "Now I can answer."]).format(n=calls[0].name)


def _tool_set(rng: random.Random, needed: list[str], exclude: set[str] = frozenset()) -> list[ToolSpec]:
    """The needed tools plus distractors, 1-4 in all, in random order."""
    total = max(len(needed), pick(rng, [1, 1, 2, 2, 2, 3, 3, 4]))
    others = [n for n in TOOLS if n not in needed and n not in exclude]
    names = list(dict.fromkeys(needed)) + rng.sample(others, total - len(set(needed)))
    rng.shuffle(names)
    return [TOOLS[n] for n in names]


def _system(rng: random.Random) -> list[dict]:
    text = pick(rng, SYSTEM_TEXTS)
    return [{"role": "system", "content": text}] if text else []


def _history(rng: random.Random, pools: Pools, specs: list[ToolSpec]) -> list[dict]:
    """Earlier, finished exchanges (the template drops their reasoning)."""
    messages = []
    for _ in range(rng.randint(1, MAX_HISTORY)):
        if not specs or rng.random() < 0.3:
            request, _, answer = _direct(rng, pools, [s.capability for s in specs])
            messages += [{"role": "user", "content": request}, {"role": "assistant", "content": answer}]
            continue
        c = pick(rng, specs).scenario(rng, pools)
        messages += [{"role": "user", "content": request_for(rng, c)}, _call_message("", [c]),
                     *_result_messages([c], [c.result]), {"role": "assistant", "content": c.answer}]
    return messages


def _tool_sample(kind: str, rng: random.Random, pools: Pools, thinking: bool, style: str) -> Sample:
    if kind == "multi":
        first = pick(rng, list(TOOLS.values()))
        if first.pair is not None and rng.random() < 0.5:
            request, calls = first.pair(rng, pools)
            request = request_for(rng, Call("", {}, request, "", {}, "", ""))
        else:
            second = pick(rng, [t for t in TOOLS.values() if t.name != first.name])
            calls = [first.scenario(rng, pools), second.scenario(rng, pools)]
            joiner = pick(rng, [" Also, ", " And ", " Then ", " Plus, "])
            second_text = calls[1].request[0].lower() + calls[1].request[1:]
            request = request_for(rng, Call("", {}, calls[0].request + joiner + second_text, "", {}, "", ""))
    else:
        calls = [pick(rng, list(TOOLS.values())).scenario(rng, pools)]
        request = request_for(rng, calls[0])
    specs = _tool_set(rng, [c.name for c in calls])
    results = [c.result for c in calls]
    keys = [c.key for c in calls]
    answer = " ".join(c.answer for c in calls)
    if kind == "error":
        err = pick(rng, ["service unavailable", "rate limit exceeded", "upstream timeout", "invalid API key"])
        results = [{"error": err}]
        keys = [err]
        answer = pick(rng, ['Sorry, {n} failed with the error "{e}". Please try again later.',
                            "I couldn't complete that: {n} reported {e}."]).format(n=calls[0].name, e=err)
    messages = _system(rng)
    if rng.random() < P_HISTORY:
        messages += _history(rng, pools, specs)
    messages.append({"role": "user", "content": request})
    prompt_len = len(messages)
    reasoning = _call_reasoning(rng, calls, style) if thinking else ""
    if thinking and rng.random() > P_KEEP_REASONING:
        reasoning_sent_back = ""
    else:
        reasoning_sent_back = reasoning
    messages.append(_call_message(reasoning_sent_back, calls))
    messages += _result_messages(calls, results)
    result_len = len(messages)
    messages.append({"role": "assistant", "content": answer,
                     "reasoning_content": _answer_reasoning(rng, calls) if thinking else ""})
    return Sample(kind, messages, [s.definition() for s in specs], thinking, prompt_len,
                  [{"name": c.name, "arguments": c.arguments} for c in calls], result_len, keys)


def _no_tool_sample(kind: str, rng: random.Random, pools: Pools, thinking: bool, style: str) -> Sample:
    specs: list[ToolSpec] = []
    lacked = ""
    if kind == "chat":
        if rng.random() < 0.6:
            request, reasoning, answer = _direct(rng, pools, [])
        else:
            c = pick(rng, list(TOOLS.values())).scenario(rng, pools)
            request = request_for(rng, c)
            reasoning = (_intent_reasoning(rng, _intent(c.name), "no_tools") if style != "topic" else
                         f"The user wants {c.topic}, but I have no tools in this conversation.")
            answer = pick(rng, ["I can't help with {t} here because I have no tools in this conversation.",
                                "Sorry, I don't have access to any tools right now, so I can't {a}."]).format(
                t=c.topic, a=TOOLS[c.name].capability)
    elif kind == "direct":
        specs = _tool_set(rng, [])
        request, reasoning, answer = _direct(rng, pools, [s.capability for s in specs])
    else:  # decline
        if rng.random() < 0.5:
            specs = _tool_set(rng, [])
            request, action = _unservable(rng, pools)
            reasoning = (_intent_reasoning(rng, action, "decline") if style != "topic" else
                         f"The user wants me to {action}. None of the available tools can do that.")
        else:
            tool = pick(rng, list(TOOLS.values()))
            lacked = tool.name
            specs = _tool_set(rng, [], exclude={tool.name})
            c = tool.scenario(rng, pools)
            request, action = request_for(rng, c), tool.capability
            reasoning = (_intent_reasoning(rng, _intent(c.name), "decline", c.name, style) if style != "topic" else
                         f"The user wants {c.topic}, but none of the available tools can {action}.")
            action = pick(rng, [action, f"help with {c.topic}"])
        answer = _decline_text(rng, action, [s.capability for s in specs])
    messages = _system(rng)
    if rng.random() < P_HISTORY:
        messages += _history(rng, pools, specs)
    messages.append({"role": "user", "content": request})
    prompt_len = len(messages)
    messages.append({"role": "assistant", "content": answer, "reasoning_content": reasoning if thinking else ""})
    return Sample(kind, messages, [s.definition() for s in specs] or None, thinking, prompt_len, missing=lacked)


def missing_twin(s: Sample, rng: random.Random) -> Sample | None:
    """A single call's conversation up to its request, with the called tool taken off the list (another in its
    place if it was the only one), answered as a missing tool's decline with "lookup" reasoning: the same
    request both ways, so only the list can tell them apart. None for anything else, or where the prompt
    names the tool elsewhere (an earlier call of it)."""
    if s.kind != "call" or not s.enable_thinking:
        return None
    name = s.expected_calls[0]["name"]
    prompt = s.messages[:s.prompt_len]
    if name in json.dumps(prompt):
        return None
    tools = [t for t in s.tools if t["function"]["name"] != name]
    if not tools:
        tools = [TOOLS[rng.choice(sorted(set(TOOLS) - {name}))].definition()]
    reasoning = _intent_reasoning(rng, _intent(name), "decline", name, "lookup")
    answer = _decline_text(rng, TOOLS[name].capability, [TOOLS[t["function"]["name"]].capability for t in tools])
    return Sample("decline", prompt + [{"role": "assistant", "content": answer, "reasoning_content": reasoning}],
                  tools, True, s.prompt_len, missing=name)


def sample(rng: random.Random, pools: Pools, kind: str | None = None, reasoning: str = "topic") -> Sample:
    kind = kind or rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    thinking = rng.random() >= P_NO_THINKING
    if kind in TOOL_KINDS:
        return _tool_sample(kind, rng, pools, thinking, reasoning)
    return _no_tool_sample(kind, rng, pools, thinking, reasoning)


def generate(split: str, n: int, seed: int | None = None, reasoning: str = "topic",
             open_values: float = 0.0, wild_values: float = 0.0) -> list[Sample]:
    """n samples of one split; the same arguments always give the same samples. open_values: the share
    of free-text values composed afresh rather than drawn from the fixed lists; wild_values: the share of
    those made of the corpus's own words in any order (entities.Pools, corpus_words)."""
    if reasoning not in REASONING:
        raise ValueError(f"reasoning must be one of {REASONING}, not {reasoning!r}")
    rng = random.Random(SEEDS[split] if seed is None else seed)
    pools = Pools(split, open_values, wild_values, corpus_words() if wild_values else ())
    return [sample(rng, pools, reasoning=reasoning) for _ in range(n)]


@cache
def corpus_words() -> tuple[str, ...]:
    """Every word of two letters or more in the first WORD_SOURCE training conversations as rendered
    (system prompts, tool lists, requests, reasoning, answers, training values), sorted: what wild values
    are made of. Held-out values' words are here only where the training text uses them too."""
    text = "\n".join(render_sample(s) for s in generate("train", WORD_SOURCE, reasoning="intent"))
    return tuple(sorted(set(re.findall(r"[^\W\d_]{2,}", text))))


# ---------------------------------------------------------------- rendering

@cache
def chat_template() -> str:
    """The real Qwen3.5 template (llama.cpp's models/templates/Qwen3.5-4B.jinja), fetched by fixtures/."""
    from fixtures.llamacpp import chat_template_path

    return chat_template_path().read_text(encoding="utf-8")


def render(messages: list[dict], tools: list[dict] | None, template: str | None = None,
           add_generation_prompt: bool = False, enable_thinking: bool = True) -> str:
    """The text transformers' apply_chat_template makes of these messages (the server renders the same way)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs = {} if enable_thinking else {"enable_thinking": False}
    rendered, _ = render_jinja_template([messages], tools=tools, chat_template=template or chat_template(),
                                        add_generation_prompt=add_generation_prompt, **kwargs)
    return rendered[0]


def render_sample(s: Sample, template: str | None = None) -> str:
    return render(s.messages, s.tools, template)


def main(argv: list[str] | None = None) -> int:
    import argparse
    from collections import Counter

    parser = argparse.ArgumentParser(description="print rendered synthetic conversations")
    parser.add_argument("--split", default="train", choices=list(SEEDS))
    parser.add_argument("-n", type=int, default=3)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stats", type=int, default=0, help="also count kinds and tools over this many samples")
    parser.add_argument("--reasoning", default="intent", choices=REASONING)
    args = parser.parse_args(argv)
    for s in generate(args.split, args.n, args.seed, args.reasoning):
        print(f"===== {s.kind} thinking={s.enable_thinking} keys={s.keys}")
        print(render_sample(s))
    if args.stats:
        samples = generate(args.split, args.stats, args.seed, args.reasoning)
        print(Counter(s.kind for s in samples))
        print(Counter(c["name"] for s in samples for c in s.expected_calls))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
