"""The synthetic corpus: seeded, schema-valid calls whose values come from the user's words, held-out
entity values disjoint from training, rendered exactly as transformers (and so our server) renders."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from demo import corpus
from demo.entities import (BODIES, EVENT_TITLES, GENRES, PHRASES, SONGS, SUBJECTS, TASKS, Pools, split_of,
                                 translation)
from demo.tools import TOOLS

jsonschema = pytest.importorskip("jsonschema")

COPIED = {"city", "symbol", "to", "subject", "body", "query", "text", "restaurant", "name", "title", "origin",
          "destination"}
ENTITY_ARGS = {"city", "symbol", "to", "restaurant", "name", "origin", "destination"}


@pytest.fixture(scope="module")
def train():
    return corpus.generate("train", 600)


@pytest.fixture(scope="module")
def heldout():
    return corpus.generate("heldout", 300)


def test_seeded(train):
    again = corpus.generate("train", 600)
    assert json.dumps([s.to_json() for s in again]) == json.dumps([s.to_json() for s in train])
    other = corpus.generate("train", 50, seed=7)
    assert json.dumps([s.to_json() for s in other]) != json.dumps([s.to_json() for s in train[:50]])


def test_every_kind_and_tool_occurs(train):
    assert set(Counter(s.kind for s in train)) == set(corpus.KINDS)
    assert {c["name"] for s in train for c in s.expected_calls} == set(TOOLS)
    multi = [s for s in train if s.kind == "multi"]
    assert multi and all(len(s.expected_calls) == 2 for s in multi)
    assert any(s.tools is None for s in train) and any(not s.enable_thinking for s in train)


@pytest.fixture(scope="module")
def open_train():
    return corpus.generate("train", 400, reasoning="intent", open_values=1.0)


@pytest.fixture(scope="module")
def wild_train():
    return corpus.generate("train", 300, seed=corpus.WILD_SEED, reasoning="intent", open_values=1.0, wild_values=1.0)


def test_calls_follow_the_schemas_and_copy_the_request(train, heldout, open_train, wild_train):
    types = Counter()
    for s in train + heldout + open_train + wild_train:
        offered = {t["function"]["name"]: t["function"]["parameters"] for t in s.tools or []}
        request = s.messages[s.prompt_len - 1]["content"]
        for call in s.expected_calls:
            assert call["name"] in offered, "only offered tools are called"
            jsonschema.validate(call["arguments"], offered[call["name"]])
            for k, v in call["arguments"].items():
                types[type(v).__name__] += 1
                if k in COPIED:
                    assert v in request, (k, v, request)
    assert {"str", "int", "bool", "dict", "list", "float"} <= set(types)


@pytest.fixture(scope="module")
def intent():
    return corpus.generate("train", 600, reasoning="intent")


def test_intent_reasoning_decides_before_any_copied_value(intent):
    """With reasoning="intent", the reasoning before a call says what the request needs in the tool list's own
    words and names the tool, and repeats none of the request's values: a model that copies a value wrongly
    there must not be led to the wrong tool."""
    descriptions = {name: spec.description.lower() for name, spec in TOOLS.items()}
    checked = 0
    for s in intent:
        if not s.enable_thinking or s.kind not in corpus.TOOL_KINDS:
            continue
        reasoning = s.messages[s.prompt_len]["reasoning_content"]
        if not reasoning:  # dropped, as a client may do once the final answer follows
            continue
        for call in s.expected_calls:
            assert call["name"] in reasoning and descriptions[call["name"]] in reasoning.lower(), reasoning
            for k, v in call["arguments"].items():
                if k in COPIED:
                    assert v not in reasoning, (v, reasoning)
        checked += 1
    assert checked > 100


def test_intent_reasoning_openers_do_not_decide(intent):
    """Every opener of the intent reasoning leads to calls and to declines alike, so the outcome can only come
    from the tool list, not from how the sentence began."""
    openers = [opener.split("{d}")[0] for opener, *_ in corpus._INTENT]
    outcomes = {}
    for s in intent:
        if not s.enable_thinking or s.kind not in ("call", "decline"):
            continue
        reasoning = s.messages[s.prompt_len]["reasoning_content"]
        if reasoning:
            opener = next(o for o in openers if reasoning.startswith(o))
            outcomes.setdefault(opener, set()).add(s.kind)
    assert len(outcomes) == 4 and all(v == {"call", "decline"} for v in outcomes.values()), outcomes


def test_a_missing_tool_decline_lacks_the_tool_its_request_needs(intent):
    """Half the declines ask for a tool the list lacks (`Sample.missing` names it), half for an action no tool does."""
    descriptions = {name: spec.description.lower() for name, spec in TOOLS.items()}
    declines = [s for s in intent if s.kind == "decline"]
    missing = [s for s in declines if s.missing]
    assert 0.3 < len(missing) / len(declines) < 0.7
    for s in missing:
        assert s.missing in TOOLS and s.missing not in {t["function"]["name"] for t in s.tools or []}
        reasoning = s.messages[s.prompt_len]["reasoning_content"]
        assert not reasoning or descriptions[s.missing] in reasoning.lower(), reasoning
    assert not any(s.missing for s in intent if s.kind != "decline")


def test_lookup_reasoning_goes_on_as_the_tool_list_does(intent):
    """With reasoning="lookup" the conversations are those of "intent" (the same draw), and where a request needs
    a tool the reasoning names it and then goes on, when the list has it, with exactly the text that follows
    that name in the rendered prompt (what a copying model can continue), and otherwise declines."""
    lookup = corpus.generate("train", 600, reasoning="lookup")
    seen = Counter()
    for a, b in zip(intent, lookup):
        assert a.messages[:a.prompt_len] == b.messages[:b.prompt_len] and a.tools == b.tools
        reasoning = b.messages[b.prompt_len]["reasoning_content"] if b.enable_thinking else ""
        if not reasoning or not (b.kind == "call" or b.missing):
            continue
        name = b.expected_calls[0]["name"] if b.kind == "call" else b.missing
        head = f'Do my tools have "{name}'
        assert head in reasoning, reasoning
        after = reasoning.split(head, 1)[1]
        prompt = corpus.render(b.messages[:b.prompt_len], b.tools, add_generation_prompt=True)
        if b.kind == "call":
            listed = after[:after.index(". Yes")]  # '", "description": "<the tool's description>"'
            assert f'"name": "{name}{listed}, "parameters"' in prompt and after.endswith(f"I'll call {name}.")
        else:
            assert f'"name": "{name}"' not in prompt and after.startswith('"? No')
        seen[b.kind] += 1
    assert seen["call"] > 100 and seen["decline"] > 10, seen


def test_a_missing_twin_asks_the_same_with_the_tool_taken_off_the_list():
    import random

    rng = random.Random(0)
    twins = 0
    for s in corpus.generate("train", 300, reasoning="lookup"):
        twin = corpus.missing_twin(s, rng)
        if twin is None:
            assert s.kind != "call" or not s.enable_thinking or s.expected_calls[0]["name"] in json.dumps(
                s.messages[:s.prompt_len])
            continue
        name = s.expected_calls[0]["name"]
        assert twin.kind == "decline" and twin.missing == name and twin.expected_calls == []
        assert twin.messages[:twin.prompt_len] == s.messages[:s.prompt_len]
        offered = {t["function"]["name"] for t in twin.tools}
        assert name not in offered and offered and offered <= set(TOOLS)
        assert offered == {t["function"]["name"] for t in s.tools} - {name} or len(s.tools) == 1
        prompt = corpus.render(twin.messages[:twin.prompt_len], twin.tools, add_generation_prompt=True)
        assert name not in prompt  # nothing in the prompt gives the tool away
        reasoning = twin.messages[-1]["reasoning_content"]
        assert f'Do my tools have "{name}"? No' in reasoning and twin.messages[-1]["content"]
        twins += 1
    assert twins > 30


def test_heldout_entities_are_never_trained_on(train, heldout):
    def values(samples):
        return {str(v) for s in samples for c in s.expected_calls for k, v in c["arguments"].items()
                if k in ENTITY_ARGS}

    seen, unseen = values(train), values(heldout)
    assert unseen and not seen & unseen
    # whole values are hashed into splits; person names and e-mails are built from split first/last names
    people = {str(c["arguments"]["name"]) for s in heldout for c in s.expected_calls if c["name"] == "lookup_contact"}
    assert all(split_of(v) == "heldout" for v in unseen - people if "@" not in v)
    assert all(split_of(part) == "heldout" for v in people for part in v.split())
    assert set(Pools("train").cities).isdisjoint(Pools("heldout").cities)


def test_open_values_are_new_training_values(open_train):
    """With open_values=1 every free-text value is composed afresh: none of the fixed lists' values, all of them
    in the training split, and (above) copied from the request like any other value."""
    fixed = set(EVENT_TITLES + SUBJECTS + BODIES + TASKS + SONGS + GENRES + list(PHRASES))
    slots = {("create_calendar_event", "title"), ("send_email", "subject"), ("send_email", "body"),
             ("create_reminder", "text"), ("translate_text", "text")}
    values = [c["arguments"][k] for s in open_train for c in s.expected_calls for name, k in slots if c["name"] == name]
    assert len(values) > 50 and len(set(values)) > 0.9 * len(values)
    assert not fixed & set(values) and all(split_of(v) == "train" for v in values)
    with pytest.raises(ValueError, match="open_values"):
        Pools("train", 1.5)


def test_wild_values_are_made_of_the_corpus_words(wild_train):
    """With wild_values=1 every open value, and every invented city, is one to four words of the training
    corpus's own text in any order, in the training split; without wild_values no wild value is drawn."""
    words = set(corpus.corpus_words())
    capitalised = {w[:1].upper() + w[1:] for w in words}
    assert {"weather", "Lisbon", "the"} <= words and not {"Copenhague", "2025"} & words
    heldout_only = {w for v in BODIES + EVENT_TITLES for w in v.strip(".!?").split() if split_of(v) == "heldout"}
    assert heldout_only - words, "words only the held-out values use stay out"
    slots = {("create_calendar_event", "title"), ("send_email", "subject"), ("send_email", "body"),
             ("create_reminder", "text")}
    values = [c["arguments"][k] for s in wild_train for c in s.expected_calls for name, k in slots if c["name"] == name]
    assert len(values) > 50 and all(split_of(v) == "train" for v in values)
    cities = {c["arguments"]["city"] for s in wild_train for c in s.expected_calls if c["name"] == "get_weather"}
    invented = cities - set(Pools("train").cities)
    assert invented and all(1 <= len(v.split()) <= 2 and set(v.split()) <= capitalised
                            for v in invented)
    for v in values:
        parts = v.split()
        assert 1 <= len(parts) <= 4 and parts[0] in capitalised and set(parts[1:]) <= words, v
    assert max(len(v.split()) for v in values) == 4
    with pytest.raises(ValueError, match="wild_values"):
        Pools("train", 1.0, 1.5, ("a",))
    with pytest.raises(ValueError, match="words"):
        Pools("train", 1.0, 0.5)


def test_open_phrases_translate_word_by_word():
    """An open phrase's made-up translation is the same for the same words, so answers quote a stable result."""
    assert translation("good night", "French") == PHRASES["good night"]["French"]
    a, b = translation("the kettle is rusty", "German").split(), translation("the kettle is new", "German").split()
    assert a[:3] == b[:3] and a[3] != b[3] and translation("the kettle is rusty", "Italian").split()[1] != a[1]


def test_final_answers_repeat_the_key_value(train, open_train, wild_train):
    for s in train + open_train + wild_train:
        if s.result_len:
            answer = s.messages[-1]["content"]
            results = " ".join(m["content"] for m in s.messages[s.prompt_len:s.result_len] if m["role"] == "tool")
            assert all(k in answer and k in results for k in s.keys), (s.keys, answer)


def test_rendering_is_transformers_and_prompts_are_prefixes(train):
    """What the model is trained on is exactly what the server renders at each step."""
    from fixtures.tokenizer import load_tokenizer

    tok = load_tokenizer()  # carries the same Qwen3.5 template
    template = corpus.chat_template()
    assert tok.chat_template == template
    for s in train[:80]:
        full = corpus.render_sample(s)
        assert full == tok.apply_chat_template(s.messages, tools=s.tools, tokenize=False)
        for upto in (s.prompt_len, s.result_len):
            if upto:
                prompt = corpus.render(s.messages[:upto], s.tools, add_generation_prompt=True,
                                       enable_thinking=s.enable_thinking)
                assert full.startswith(prompt)
                assert prompt == tok.apply_chat_template(
                    s.messages[:upto], tools=s.tools, tokenize=False, add_generation_prompt=True,
                    **({} if s.enable_thinking else {"enable_thinking": False}))
