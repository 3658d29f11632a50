"""Incremental detokenizing against the tokenizer's own whole decode; stop-string holdback."""

import pytest
from fixtures import get_fixture

from model import load_tokenizer
from server.engine.detokenizer import Detokenizer, StopStrings, hidden_token_ids


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(get_fixture("moe_r4").hf_dir)


def test_pieces_join_to_whole_decode_and_never_split_a_character(tok):
    text = "Grüße aus Köln — 東京 🙂 naïve café <tool_call>\n{\"a\": 1}\n</tool_call> end"
    ids = tok.encode(text, add_special_tokens=False)
    d = Detokenizer(tok, hidden_token_ids(tok))
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_control_tokens_hidden_format_tokens_kept(tok):
    hidden = hidden_token_ids(tok)
    assert tok.convert_tokens_to_ids("<|im_end|>") in hidden
    d = Detokenizer(tok, hidden)
    assert d.add(tok.convert_tokens_to_ids("<|im_end|>")) == ""

    class MarksFormatTokensSpecial:  # as a checkpoint may do for <think> / <tool_call>
        all_special_ids = [7, 8, 9]

        def convert_tokens_to_ids(self, token):
            return {"<think>": 8, "<tool_call>": 9}.get(token)

    assert hidden_token_ids(MarksFormatTokensSpecial()) == {7}


def test_stop_strings_held_back_and_cut():
    s = StopStrings(["STOP", "</end>"])
    assert s.feed("abc ST") == ("abc ", False)
    assert s.feed("O") == ("", False)
    assert s.feed("Px") == ("", True)
    s = StopStrings(["STOP"])
    assert s.feed("abc ST") == ("abc ", False)
    assert s.feed("ART") == ("START", False)
    assert s.flush() == ""
    s = StopStrings(["</end>"])
    assert s.feed("x </e") == ("x ", False)
    assert s.flush() == "</e"
