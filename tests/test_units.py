"""Whole-word units and protected spans (curate.units) against a brute force, on text and token boundaries that
hypothesis draws, and on the shapes of the shared data (GSM8K answers, glaive and OpenAI tool calls)."""

import json
import re

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from curate import units

ALPHABET = "ab7 9,.=<>_#{}\"'\n-"


@st.composite
def tokenised_text(draw):
    text = draw(st.text(alphabet=ALPHABET, min_size=1, max_size=60))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=30))) - {len(text)})
    bounds = [0, *cuts, len(text)]
    starts, ends = np.array(bounds[:-1]), np.array(bounds[1:])
    trainable = np.array(draw(st.lists(st.integers(0, 1), min_size=len(starts), max_size=len(starts))), np.int8)
    return text, starts, ends, trainable


def bf_units(text, starts, ends, trainable):
    """Union-find over trainable tokens: two consecutive trainable tokens are one unit when some word or number
    (units.UNIT) has characters in both."""
    matches = [m.span() for m in units.UNIT.finditer(text)]

    def touched(i):
        return {j for j, (a, b) in enumerate(matches) if starts[i] < b and ends[i] > a}

    out, u = [], -1
    for i in range(len(starts)):
        if not trainable[i]:
            out.append(-1)
            continue
        if not (i > 0 and trainable[i - 1] and touched(i) & touched(i - 1)):
            u += 1
        out.append(u)
    return out


@settings(max_examples=400, deadline=None)
@given(tokenised_text())
def test_units_match_brute_force_and_never_split_a_word_or_number(case):
    text, starts, ends, trainable = case
    got = units.unit_ids(text, starts, ends, trainable)
    assert got.tolist() == bf_units(text, starts, ends, trainable)
    for m in re.finditer(r"\d+(?:[.,]\d+)*|\w+", text):  # every number and word lies in one unit
        inside = [i for i in range(len(starts)) if starts[i] < m.end() and ends[i] > m.start()]
        if all(trainable[i] for i in inside):  # (a word cut by the prompt boundary is not the mask's to keep)
            assert len({int(got[i]) for i in inside}) == 1


def test_a_gsm8k_answer_keeps_its_numbers_whole():
    text = "12*52=<<12*52=624>>624 pages\n#### 1,624"
    cuts = [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19, 20, 21, 22, 28, 29, 34, 35, 36, 37, 38]
    starts, ends = np.array(cuts), np.array(cuts[1:] + [len(text)])
    got = units.unit_ids(text, starts, ends, np.ones(len(starts), np.int8))
    by_unit = {}
    for i, u in enumerate(got):
        by_unit.setdefault(int(u), []).append(text[starts[i] : ends[i]])
    pieces = ["".join(p) for p in by_unit.values()]
    assert "624" in pieces and "1,624" in pieces and "12" in pieces and "52" in pieces


def spans_of(text, presets, patterns=()):
    return [text[a:b] for a, b, _ in units.protected_spans(text, [(0, len(text))], presets, patterns)]


def test_protected_spans_presets_and_regexes():
    assert spans_of("so 3 + 4 = 7\n#### 7", ("final-answer",)) == ["#### 7"]
    assert spans_of(r"thus \boxed{\frac{1}{2}} and \boxed{x^{2}}.", ("final-answer",)) == [r"\boxed{x^{2}}"]
    assert spans_of("pay $1,250.50 for 3", ("numbers",)) == ["1,250.50", "3"]
    assert spans_of("see:\n```py\nx = 1\n```\ndone", ("code",)) == ["```py\nx = 1\n```"]
    assert spans_of("Answer: Paris. Bye", (), (r"Answer: \w+",)) == ["Answer: Paris"]
    glaive = json.dumps({"name": "calculate_discount", "arguments": {"original_price": 200}})
    assert spans_of(glaive, ("tool-calls",)) == [glaive]
    openai = json.dumps([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
    assert spans_of(openai, ("tool-calls",)) == [openai]
    inline = f"<functioncall> {glaive} then {{not json}} and {json.dumps({'a': 1})}"
    assert spans_of(inline, ("tool-calls",)) == [glaive]


def test_token_kinds():
    text = "x 42, yes!"
    starts, ends = np.array([0, 1, 4, 5, 9]), np.array([1, 4, 5, 9, 10])
    assert [units.KINDS[k] for k in units.token_kinds(text, starts, ends)] == [
        "words",
        "digits",
        "punctuation",
        "words",
        "punctuation",
    ]
