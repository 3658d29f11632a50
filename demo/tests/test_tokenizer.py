"""The demo tokenizer: Qwen3.5's pre-tokenizer, Qwen's special and markup tokens as single tokens,
identical through transformers, and the training labels cover exactly the assistant turns."""

from __future__ import annotations

import pytest

from demo import corpus
from demo.tokenizer import CONTROL_TOKENS, MARKUP_TOKENS, SPLIT_REGEX, save_hf_tokenizer, train_bpe
from demo.train import ASSISTANT_SPAN, IGNORE, encode


@pytest.fixture(scope="module")
def texts():
    return [corpus.render_sample(s) for s in corpus.generate("train", 120)]


@pytest.fixture(scope="module")
def tok(texts):
    return train_bpe(texts, 700)


def test_special_tokens_are_single_added_tokens(tok):
    n = tok.get_vocab_size()
    ids = [tok.token_to_id(t) for t in CONTROL_TOKENS + MARKUP_TOKENS]
    assert ids == list(range(n - len(ids), n)), "appended after the learned vocabulary"
    text = "".join(CONTROL_TOKENS + MARKUP_TOKENS)
    assert tok.encode(text, add_special_tokens=False).ids == ids
    added = {t.content: t for t in tok.get_added_tokens_decoder().values()}
    assert all(added[t].special for t in CONTROL_TOKENS)
    assert not any(added[t].special for t in MARKUP_TOKENS), "markup stays visible, as in Qwen's tokenizers"


def test_qwen35_pre_tokenizer():
    from transformers.models.qwen3_5 import tokenization_qwen3_5

    assert SPLIT_REGEX == tokenization_qwen3_5.PRETOKENIZE_REGEX


def test_words_are_the_same_tokens_in_every_context(tok):
    """A value is copied from the user's sentence into a call and from JSON into an answer: the same
    ids wherever it stands (after a space, a quote, a newline), for names never seen in training."""
    for word in ["Lisbon", "Dongounheim", "Kastrin Velmora", "ACME", "anna.berg@example.com", "2026-04-23"]:
        alone = tok.encode(word, add_special_tokens=False).ids
        for context in (f"weather in {word}?", f'"{word}"', f"<parameter=city>\n{word}\n</parameter>", f"({word})"):
            ids = tok.encode(context, add_special_tokens=False).ids
            assert any(ids[i:i + len(alone)] == alone for i in range(len(ids))), (word, context)


def test_round_trip_and_unseen_text(tok, texts):
    for text in texts[:20] + ["Zürich, São Paulo and Kraków: 東京 ✅ 12345"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_transformers_loads_it_identically(tok, texts, tmp_path):
    from transformers import AutoTokenizer

    save_hf_tokenizer(tok, tmp_path, corpus.chat_template())
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert type(hf).__name__ == "Qwen3_5Tokenizer"
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>"
    for text in texts[:20]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False).ids
    s = corpus.generate("heldout", 1)[0]
    assert hf.apply_chat_template(s.messages, tools=s.tools, tokenize=False) == corpus.render_sample(s)


def test_labels_cover_exactly_the_assistant_turns(tok, texts):
    for text in texts[:20]:
        ids, labels, _ = encode(tok, text)
        kept = [t for t, y in zip(ids, labels) if y != IGNORE]
        assert [y for y in labels if y != IGNORE] == kept
        expected = "".join(m.group(1) for m in ASSISTANT_SPAN.finditer(text))
        assert tok.decode(kept, skip_special_tokens=False) == expected


def test_focus_marks_the_lookup_decision(tok):
    """With reasoning="lookup", the token right after the looked-up name (the list has it, or not) is a decision."""
    seen = set()
    for s in corpus.generate("train", 80, reasoning="lookup"):
        reasoning = s.messages[s.prompt_len].get("reasoning_content", "") if s.enable_thinking else ""
        if "Do my tools have" not in reasoning:
            continue
        ids, labels, focus = encode(tok, corpus.render_sample(s))
        flagged = [tok.id_to_token(t) for t, f in zip(ids, focus) if f]
        assert any(t.startswith('"') for t in flagged), (reasoning, flagged)  # '",' or '"?' where merged
        seen.add(s.kind)
    assert {"call", "decline"} <= seen


def test_focus_marks_the_decisions_in_assistant_turns(tok):
    """Focus flags: only on assistant tokens; on <tool_call>, the called functions' snake_case names
    (a one-word name such as calculate is not marked) and every argument value (as the template writes
    it; with ends=True and the newline that ends it), and not on the plain answer text."""
    import json

    checked = 0
    for s in corpus.generate("train", 60):
        text = corpus.render_sample(s)
        ids, labels, focus = encode(tok, text)
        assert all(y != IGNORE for y, f in zip(labels, focus) if f), "focus outside an assistant turn"
        if not s.expected_calls:
            continue
        flagged = tok.decode([t for t, f in zip(ids, focus) if f], skip_special_tokens=False)
        ends = encode(tok, text, ends=True)[2]
        flagged_ends = tok.decode([t for t, f in zip(ids, ends) if f], skip_special_tokens=False).replace(" ", "")
        assert "<tool_call>" in flagged
        for call in s.expected_calls:
            if "_" in call["name"]:
                assert call["name"].replace("_", "") in flagged.replace("_", "")
            for value in call["arguments"].values():
                if isinstance(value, (str, bool)):
                    shown = str(value)  # the template writes a boolean as Python does
                else:
                    shown = json.dumps(value, ensure_ascii=False)
                assert shown.replace(" ", "") in flagged.replace(" ", "")
                assert shown.replace(" ", "") + "\n" in flagged_ends and shown + "\n" not in flagged
        answer = s.messages[-1]["content"]
        first_word = answer.split()[0]
        kept = tok.decode([t for t, y, f in zip(ids, labels, focus) if y != IGNORE and not f], skip_special_tokens=False)
        assert first_word in kept
        checked += 1
    assert checked >= 20
