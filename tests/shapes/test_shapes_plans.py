"""Reading plans back: noun phrases, relations (either way round), and whether a plan is right."""
import random

import pytest

from shapes.meaning import describe
from shapes.plans import PlanReading, parse_plan, plan_is_right
from shapes.prompts import generate


def test_parse_noun_phrases_and_relations():
    assert parse_plan("<think> two red squares to the left of a circle </think>") == PlanReading(
        objects=((2, "red", "square"), (1, None, "circle")), relation=("left_of", "square", "circle"))
    assert parse_plan("a yellow circle").objects == ((1, "yellow", "circle"),)
    assert parse_plan("3 blue triangles and an orange square").objects == ((3, "blue", "triangle"),
                                                                          (1, "orange", "square"))
    assert parse_plan("above").relation is None and parse_plan("").objects == ()


@pytest.mark.parametrize("family", ["single_object", "two_objects", "counting", "colors", "position", "color_attr",
                                    "implicit_color", "implicit_count"])
def test_the_explicit_restatement_of_every_family_is_a_right_plan(family):
    """What pretraining writes as the plan (the prompt's explicit meaning) reads back as right."""
    rng = random.Random(7)
    for _ in range(40):
        p = generate(family, rng)
        assert plan_is_right(f"<think> {describe(p.meaning, number_one=True)} </think>", p.meaning), p.text


def test_wrong_plans_are_wrong():
    rng = random.Random(3)
    p = generate("implicit_color", rng)
    colour = p.meaning.objects[0].colour
    other = next(c for c in ("red", "blue", "green") if c != colour)
    shape = p.meaning.objects[0].shape
    assert plan_is_right(f"a {colour} {shape}", p.meaning)
    assert not plan_is_right(f"a {other} {shape}", p.meaning)                  # the fact not resolved
    assert not plan_is_right(f"a {shape}", p.meaning)                          # restates, does not resolve
    pos = next(q for q in (generate("position", rng) for _ in range(50)) if q.meaning.relation.relation == "above")
    a, b = (s.shape for s in pos.meaning.objects)
    assert plan_is_right(f"a {a} above a {b}", pos.meaning) and plan_is_right(f"a {b} below a {a}", pos.meaning)
    assert not plan_is_right(f"a {a} below a {b}", pos.meaning)
    cnt = generate("counting", random.Random(1))
    n, shape = cnt.meaning.objects[0].count, cnt.meaning.objects[0].shape
    assert not plan_is_right(f"{n + 1} {shape}s", cnt.meaning)
