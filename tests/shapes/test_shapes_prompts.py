"""Prompt families, their meanings, the facts table and explicit restatements."""
import random
from collections import Counter

import pytest

from shapes.facts import (COLOUR_FACTS, COUNT_FACTS, FACTS, IMPLICIT_COLOUR_FACTS, IMPLICIT_COUNT_FACTS,
                          colour_facts, count_facts)
from shapes.meaning import describe
from shapes.prompts import FAMILIES, generate
from shapes.world import COLOUR_NAMES, MAX_COUNT, RELATION_PHRASES, number_word


def _prompts(n_per_family=40, seed=0):
    rng = random.Random(seed)
    return [generate(f, rng) for f in FAMILIES for _ in range(n_per_family)]


def test_every_family_is_generated_with_consistent_meanings():
    seen = Counter()
    for p in _prompts():
        seen[p.family] += 1
        m, specs = p.meaning, p.meaning.objects
        assert p.id.startswith(p.family + "-") and p.text and p.explicit_text
        if p.family in ("single_object", "colors", "implicit_color"):
            assert len(specs) == 1 and specs[0].count == 1
        if p.family in ("colors", "implicit_color"):
            assert specs[0].colour in COLOUR_NAMES
        if p.family in ("counting", "implicit_count"):
            assert len(specs) == 1 and 1 <= specs[0].count <= MAX_COUNT and specs[0].colour is None
        if p.family in ("two_objects", "position", "color_attr"):
            assert len(specs) == 2 and specs[0].shape != specs[1].shape
            assert (specs[0].colour is None) == (p.family != "color_attr")
        if p.family == "color_attr":
            assert specs[0].colour != specs[1].colour
            assert all(s.colour in p.text for s in specs)
        if p.family == "position":
            assert m.relation is not None and RELATION_PHRASES[m.relation.relation] in p.text
        else:
            assert p.family == "edit" or m.relation is None
        if p.family == "implicit_color":
            assert m.fact in IMPLICIT_COLOUR_FACTS and m.fact.value == specs[0].colour and m.fact.phrase in p.text
            assert specs[0].colour not in p.text.split()          # to be inferred, never named
        if p.family == "implicit_count":
            assert m.fact in IMPLICIT_COUNT_FACTS and m.fact.value == specs[0].count and m.fact.phrase in p.text
            assert number_word(specs[0].count) not in p.text.split()
            assert number_word(specs[0].count) in p.explicit_text
        if p.family == "edit":
            assert m.source is not None and m.preserve
        else:
            assert m.source is None and not m.preserve
        if p.family not in ("counting", "implicit_count"):
            assert p.explicit_text == describe(m)
    assert set(seen) == set(FAMILIES)


def test_generation_is_deterministic():
    assert _prompts(5, seed=3) == _prompts(5, seed=3)
    assert [p.id for p in _prompts(5, seed=3)] != [p.id for p in _prompts(5, seed=4)]


def test_examples_read_naturally():
    m = generate("implicit_color", random.Random(1)).explicit_text
    assert m.split()[0] in ("a", "an") and m.split()[-1] in ("circle", "square", "triangle")
    texts = {p.text for p in _prompts(20)}
    assert any(t.startswith("a photo of") for t in texts)
    assert not any("  " in t or t != t.strip() or " ," in t for t in texts)
    assert not any(t.startswith("a orange") or " a orange" in t for t in texts)


def test_facts_table():
    for colour in COLOUR_NAMES:
        assert len(colour_facts(colour)) >= 3
    for n in range(1, MAX_COUNT + 1):
        assert len(count_facts(n)) >= 2
    for f in FACTS:
        assert f.question.endswith("?")
        assert f.answer == (f.value if f.kind == "colour" else number_word(f.value))
    with pytest.raises(ValueError, match="colour='teal'"):
        colour_facts("teal")


def test_facts_that_name_their_answer_are_text_qa_only():
    named = [f for f in FACTS if f.answer in f.phrase.split()]
    assert [f.phrase for f in named] == ["an orange"]            # "the colour of an orange"
    assert all(f.names_answer for f in named) and not any(f.names_answer for f in FACTS if f not in named)
    assert set(IMPLICIT_COLOUR_FACTS) == set(COLOUR_FACTS) - set(named)
    assert set(IMPLICIT_COUNT_FACTS) == set(COUNT_FACTS)
    rng = random.Random(0)
    assert not any(generate("implicit_color", rng).meaning.fact in named for _ in range(500))


def test_a_prompt_can_be_asked_for_a_fact():
    fact = IMPLICIT_COUNT_FACTS[0]
    p = generate("implicit_count", random.Random(0), fact=fact)
    assert p.meaning.fact == fact and fact.phrase in p.text and p.meaning.objects[0].count == fact.value
    with pytest.raises(ValueError, match="'a unicycle has wheels' cannot make a 'implicit_color'"):
        generate("implicit_color", random.Random(0), fact=fact)
    with pytest.raises(ValueError, match="'an orange' cannot make a 'implicit_color' prompt \\(not one of"):
        generate("implicit_color", random.Random(0), fact=next(f for f in FACTS if f.phrase == "an orange"))
    with pytest.raises(ValueError, match="cannot make a 'counting'"):
        generate("counting", random.Random(0), fact=fact)


def test_unknown_family_is_named():
    with pytest.raises(ValueError, match="family='poetry'"):
        generate("poetry", random.Random(0))
