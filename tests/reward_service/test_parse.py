"""LLM decomposition replies: repaired where possible, a clear error naming the prompt otherwise.

The fuzz tests state the contract: whatever the reply, `parse_decomposition` either returns a valid,
non-empty QuestionSet or raises DecompositionError — never another exception, never an empty set.
"""
import json
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reward_service.parse import DecompositionError, decompose_with_retries, parse_decomposition
from reward_service.schema import CATEGORIES, DecomposerVersion, QuestionSet
from reward_service.templates import TEMPLATE_VERSION, decomposition_request

V = DecomposerVersion(name="fake-llm", template_version=TEMPLATE_VERSION)
PROMPT = "two red apples on a table"
GOOD = [{"id": "q1", "question": "Is there an apple?", "kind": "semantic", "category": "existence", "parents": []},
        {"id": "q2", "question": "Are the apples red?", "kind": "semantic", "category": "attribute", "parents": ["q1"]},
        {"id": "q3", "question": "Do the apples look natural?", "kind": "quality", "category": "geometry",
         "parents": []}]


def parse(text):
    return parse_decomposition(text, prompt=PROMPT, version=V)


def test_clean_reply():
    qs = parse(json.dumps(GOOD))
    assert [q.id for q in qs.questions] == ["q1", "q2", "q3"] and qs.notes == ()
    assert qs.questions[1].parents == ("q1",) and qs.questions[2].kind == "quality"
    assert qs.version == V and qs.prompt == PROMPT


@pytest.mark.parametrize("text, note", [
    ("Sure! Here you go:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```\nHope this helps.", None),
    (json.dumps(GOOD)[:-1] + ",]", "trailing commas"),
    (str(GOOD), "Python-style"),                         # single quotes
    (json.dumps(GOOD).replace('"', "\u201c", 1), None),    # a smart quote
    (json.dumps(GOOD)[:-30], "cut off"),                 # truncated mid third item
    (json.dumps({"questions": GOOD}), "unwrapped"),
])
def test_text_repairs(text, note):
    qs = parse(text)
    assert qs.questions[0].text == "Is there an apple?" and len(qs.questions) >= 2
    if note:
        assert any(note in n for n in qs.notes), qs.notes


def test_field_repairs_are_noted():
    reply = json.dumps([
        {"question": "Is there an apple?", "category": "Entity", "parents": 0},                 # no id, no kind
        {"id": 7, "text": "Is the apple red?", "type": "COLOR", "parent": 1},                  # int ids, synonyms
        {"id": 7, "question": "Is the apple left of the pear?", "category": "position", "parents": "1, 7, q9"},
        {"id": "x", "question": "Is the lighting soft?", "kind": "semantic", "aspect": "lighting"},
        {"id": "y", "question": "Is it whimsical?", "category": "vibes"},
        {"id": "z", "question": "   "},
        "Is there a pear?",
        42,
    ])
    qs = parse(reply)
    by_text = {q.text: q for q in qs.questions}
    assert by_text["Is there an apple?"].category == "existence" and by_text["Is there an apple?"].id == "q1"
    assert by_text["Is the apple red?"].id == "7" and by_text["Is the apple red?"].category == "attribute"
    left = by_text["Is the apple left of the pear?"]
    assert left.id != "7" and left.category == "spatial" and left.parents == ("7",)   # "1" and "q9" dangle
    assert by_text["Is the lighting soft?"].kind == "quality"
    assert by_text["Is it whimsical?"].category == "attribute"
    assert by_text["Is there a pear?"].kind == "semantic"
    notes = " | ".join(qs.notes)
    for expected in ("renamed", "dangling parent 'q9'", "contradicts category", "unknown category 'vibes'",
                     "no question text", "bare string", "int is not an object"):
        assert expected in notes, (expected, notes)


def test_cycles_are_broken_in_list_order():
    reply = json.dumps([{"id": "a", "question": "A?", "parents": ["b"]},
                        {"id": "b", "question": "B?", "parents": ["a"]},
                        {"id": "c", "question": "C?", "parents": ["c", "b"]}])
    qs = parse(reply)
    assert [q.parents for q in qs.questions] == [("b",), (), ("b",)]
    assert any("close a cycle" in n for n in qs.notes) and any("self parent" in n for n in qs.notes)


@pytest.mark.parametrize("text, reason", [
    ("I'm sorry, I can't help with that.", "no JSON list"),
    ("[]", "no usable questions"),
    ('[{"id": 1}, {"question": ""}]', "no usable questions"),
    ('{"a": 1, "b": 2}', "no question list"),
    (json.dumps([{"question": f"q{i}?"} for i in range(65)]), "65 questions \\(limit 64\\)"),
    (None, "not text"),
])
def test_unusable_replies_name_the_prompt(text, reason):
    with pytest.raises(DecompositionError, match=reason) as e:
        parse(text)
    assert PROMPT in str(e.value) and e.value.prompt == PROMPT
    again = pickle.loads(pickle.dumps(e.value))
    assert str(again) == str(e.value) and again.reason == e.value.reason


def test_retries_within_budget_then_fail_naming_the_prompt():
    replies = iter(["no idea", "[]", json.dumps(GOOD)])
    requests = []

    def generate(request):
        requests.append(request)
        return next(replies)

    qs = decompose_with_retries(generate, PROMPT, budget=3, version=V)
    assert len(qs.questions) == 3 and len(requests) == 3
    assert requests[0] == decomposition_request(PROMPT) and PROMPT in requests[0]
    assert "could not be used: no JSON list" in requests[1]
    with pytest.raises(DecompositionError, match=r"no usable reply in 2 attempts \(attempt 1: .*attempt 2: ") as e:
        decompose_with_retries(lambda _: "nope", PROMPT, budget=2, version=V)
    assert e.value.prompt == PROMPT
    with pytest.raises(ValueError, match="budget=0"):
        decompose_with_retries(lambda _: "", PROMPT, budget=0, version=V)


# ---- fuzzing ------------------------------------------------------------------------------------------

def _contract(text):
    try:
        qs = parse(text)
    except DecompositionError as e:
        assert PROMPT in str(e)
        return
    assert isinstance(qs, QuestionSet) and len(qs.questions) >= 1
    ids = {q.id for q in qs.questions}
    for q in qs.questions:
        assert q.category in CATEGORIES[q.kind] and set(q.parents) <= ids and q.text.strip()


scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["q1", "q2", "0", "existence", "geometry", "quality",
                                                           "semantic", "Count", "q1, q2", ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
keys = st.sampled_from(["id", "question", "text", "kind", "category", "aspect", "parents", "parent", "type", "q"])
items = st.dictionaries(keys, json_values | scalars, max_size=7)
replies = st.lists(items | json_values, max_size=8)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies, st.sampled_from(["plain", "fenced", "truncated", "single_quotes", "trailing_comma", "wrapped"]))
def test_fuzzed_structured_replies_never_crash_or_go_empty(reply, mutation):
    text = json.dumps({"questions": reply} if mutation == "wrapped" else reply)
    if mutation == "fenced":
        text = "Here:\n```json\n" + text + "\n```"
    elif mutation == "truncated":
        text = text[: max(1, len(text) * 2 // 3)]
    elif mutation == "single_quotes":
        text = text.replace('"', "'")
    elif mutation == "trailing_comma":
        text = text.replace("}", ",}").replace("]", ",]")
    _contract(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("[]{}\"',:0123456789 qidparentsquestion\n`jsonTrueNull\\")),
               max_size=120))
def test_fuzzed_json_like_text_never_crashes(text):
    _contract(text)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_fuzzed_arbitrary_text_never_crashes(text):
    _contract(text)
