"""The evaluation's probes (tool-list lookup, argument copying), against stand-in models whose behaviour is known."""

from __future__ import annotations

import math

import pytest

from demo import corpus
from demo.evaluate import copy_probe, copy_samples, divergence, lookup_probe
from demo.tools import TOOLS


def _needed(prefix: str) -> str:
    reasoning = prefix.rsplit("<think>\n", 1)[1]
    return next(name for name in TOOLS if TOOLS[name].description[1:] in reasoning)


def _reads_the_list(prefix: str, tail: str) -> float:
    """Declines (P 0.9) exactly when the tool the reasoning names is not among the offered ones."""
    name = _needed(prefix)
    offered = f'"name": "{name}"' in prefix
    is_call = name in tail
    return math.log(0.9 if is_call == offered else 0.1)


def _ignores_the_list(prefix: str, tail: str) -> float:
    """Calls with P 0.8 whatever the list offers."""
    return math.log(0.8 if _needed(prefix) in tail else 0.2)


@pytest.mark.parametrize("style", ["intent", "lookup"])
def test_lookup_probe_separates_a_model_that_reads_the_list_from_one_that_does_not(style):
    samples = corpus.generate("heldout", 120, reasoning=style)
    reads = lookup_probe(_reads_the_list, samples, n=20, style=style)
    assert reads["n"] == 20
    assert math.isclose(reads["p_decline_offered"], 0.1, abs_tol=1e-3)
    assert math.isclose(reads["p_decline_removed"], 0.9, abs_tol=1e-3)
    ignores = lookup_probe(_ignores_the_list, samples, n=20, style=style)
    assert math.isclose(ignores["p_decline_offered"], 0.2, abs_tol=1e-3)
    assert math.isclose(ignores["p_decline_removed"], 0.2, abs_tol=1e-3)


def _characters(text: str):
    """A stand-in tokenizer: one token per character."""
    return [ord(c) for c in text], [(i, i + 1) for i in range(len(text))]


def test_copy_samples_hold_held_out_values_of_each_kind():
    """The copy probe's three kinds of values: all held out; open and wild ones new compositions, wild ones made
    of the training corpus's words."""
    from demo.entities import BODIES, EVENT_TITLES, split_of

    def titles(values):
        return [c["arguments"]["title"] for s in copy_samples(values, 300, "intent") for c in s.expected_calls
                if c["name"] == "create_calendar_event"]

    fixed, open_, wild = titles("fixed"), titles("open"), titles("wild")
    assert min(map(len, (fixed, open_, wild))) > 5
    assert all(split_of(v) == "heldout" for v in fixed + open_ + wild)
    assert set(fixed) <= set(EVENT_TITLES) and not set(open_ + wild) & set(EVENT_TITLES + BODIES)
    words = set(corpus.corpus_words())
    assert all(set(v.split()[1:]) <= words for v in wild) and not all(set(v.split()[1:]) <= words for v in open_)


def test_copy_probe_scores_the_value_tokens_of_copied_arguments():
    samples = corpus.generate("heldout", 60, reasoning="intent")
    copied = [v for s in samples if s.kind in ("call", "multi") for c in s.expected_calls
              for v in c["arguments"].values() if isinstance(v, str) and v in s.messages[s.prompt_len - 1]["content"]]

    def perfect(text):
        ids, spans = _characters(text)
        return ids, spans, ids[1:] + [0]

    def never(text):
        ids, spans = _characters(text)
        return ids, spans, [-1] * len(ids)

    def first_only(text):
        """Right on every token but the second character of each copied value."""
        ids, spans = _characters(text)
        pred = ids[1:] + [0]
        pos = text.rindex("<|im_start|>assistant")
        while (at := text.find("<parameter=", pos)) >= 0:
            start = text.index(">\n", at) + 2
            pred[start] = -1  # the prediction after the value's first character
            pos = start
        return ids, spans, pred

    def not_after_spaces(text):
        """Right on every token but those right after a space inside the assistant's turn."""
        ids, spans = _characters(text)
        pos = text.rindex("<|im_start|>assistant")
        return ids, spans, [-1 if i >= pos and c == " " else t for i, (c, t) in enumerate(zip(text, ids[1:] + [0]))]

    def running_on(text):
        """Right on every token but the newline after each value: it goes on with a space."""
        ids, spans, pred = perfect(text)
        pos = text.rindex("<|im_start|>assistant")
        return ids, spans, [ord(" ") if i >= pos and text.startswith("\n</parameter>", i + 1) else t
                            for i, t in enumerate(pred)]

    assert copy_probe(perfect, samples) == {"values": len(copied), "exact_values": 1.0, "exact_and_ended": 1.0,
                                            "first_token": 1.0, "later_tokens": 1.0, "after_space": 1.0}
    assert copy_probe(never, samples) | {"values": 0} == {"values": 0, "exact_values": 0.0, "exact_and_ended": 0.0,
                                                          "first_token": 0.0, "later_tokens": 0.0, "after_space": 0.0}
    assert copy_probe(running_on, samples) == copy_probe(perfect, samples) | {"exact_and_ended": 0.0}
    partial = copy_probe(first_only, samples)
    assert partial["first_token"] == 1.0 and partial["exact_values"] < 0.2 and 0.7 < partial["later_tokens"] < 1.0
    assert partial["after_space"] == 1.0  # no value starts with a space
    spaced = copy_probe(not_after_spaces, samples)
    assert spaced["after_space"] == 0.0 and spaced["first_token"] == 1.0 and 0.7 < spaced["later_tokens"] < 1.0
    assert spaced["exact_values"] == pytest.approx(sum(" " not in v for v in copied) / len(copied), abs=1e-4)
    assert len(copied) > 20


@pytest.mark.parametrize("args", [["-n", "-1"], ["--lookup", "-3", "--hf", "x"], ["--quant-n", "-1"],
                                  ["--copy", "-2"]])
def test_cli_rejects_negative_counts(args, capsys):
    from demo.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and "must be 0 or more" in capsys.readouterr().err


def test_cli_asks_for_the_checkpoint_the_probe_needs(capsys):
    from demo.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(["-n", "0", "--lookup", "5"])
    assert exc.value.code == 2 and "--lookup needs --hf DIR" in capsys.readouterr().err


def test_divergence_statistics():
    """KL(ref || other) per position from hand-written two-token distributions (each KL written out below)."""
    import numpy as np

    def rows(*dists):  # one row per list of positions, as mlx_logprobs returns them (targets unused)
        return [(np.log(np.array(d, dtype=np.float64)), np.zeros(len(d), int)) for d in dists]

    ref = rows([[0.6, 0.4], [0.9, 0.1]], [[0.2, 0.8]])
    other = rows([[0.3, 0.7], [0.9, 0.1]], [[0.1, 0.9]])
    kl = sorted([0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7), 0.0,
                 0.2 * math.log(0.2 / 0.1) + 0.8 * math.log(0.8 / 0.9)])
    d = divergence(ref, other)
    assert d["kld"] == pytest.approx(sum(kl) / 3, abs=1e-5)
    assert d["kld_max"] == pytest.approx(kl[2], abs=1e-3)
    assert d["kld_p99"] == pytest.approx(kl[1] + 0.98 * (kl[2] - kl[1]), abs=1e-4)  # linear between the top two
    assert d["same_top"] == pytest.approx(2 / 3, abs=1e-4)  # the first position's top token flips
    assert divergence(ref, ref) == {"kld": 0.0, "kld_p99": 0.0, "kld_max": 0.0, "same_top": 1.0}
