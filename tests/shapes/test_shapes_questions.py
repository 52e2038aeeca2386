"""Atomic questions: soft answers are high for true and low for false questions on renders."""
import random

import pytest

from shapes.layout import sample_scene
from shapes.prompts import FAMILIES, generate
from shapes.questions import AtomicQuestion, _count_distribution, answer, answer_all, questions_for, truth
from shapes.scene import render
from shapes.world import COLOUR_NAMES, INVERSE_RELATION, RELATIONS, SHAPES


def _random_question(rng: random.Random, scene) -> AtomicQuestion:
    kind = rng.choice(("exists", "count", "colour_of"))
    shape = rng.choice(SHAPES)
    colour = rng.choice((None, *COLOUR_NAMES))
    if kind == "exists":
        return AtomicQuestion(kind=kind, shape=shape, colour=colour)
    if kind == "count":
        return AtomicQuestion(kind=kind, shape=shape, colour=colour, n=rng.randint(0, 4))
    # colour_of is only well posed when the scene has at most one object of the shape
    return AtomicQuestion(kind=kind, shape=shape, colour=rng.choice(COLOUR_NAMES))


@pytest.mark.parametrize("canvas_size", (32, 64))
def test_true_high_false_low(canvas_size):
    rng = random.Random(canvas_size)
    n_true = n_false = 0
    for i in range(60):
        prompt = generate(FAMILIES[i % len(FAMILIES)], rng, canvas_size=canvas_size)
        scene = sample_scene(prompt.meaning, rng, canvas_size=canvas_size)
        image = render(scene)
        qs = list(questions_for(prompt.meaning))
        assert all(truth(scene, q) for q in qs)
        if prompt.meaning.relation is not None and prompt.family == "position":
            r = prompt.meaning.relation.relation
            base = qs[-1]
            qs.append(AtomicQuestion(kind="relation", shape=base.shape, colour=base.colour,
                                     relation=INVERSE_RELATION[r], other_shape=base.other_shape))
            qs.append(AtomicQuestion(kind="relation", shape=base.other_shape, relation=r, other_shape=base.shape))
        for _ in range(6):
            q = _random_question(rng, scene)
            if q.kind != "colour_of" or sum(o.shape == q.shape for o in scene.objects) <= 1:
                qs.append(q)
        for q, a in zip(qs, answer_all(image, qs)):
            assert 0.0 <= a <= 1.0
            if truth(scene, q):
                n_true += 1
                assert a > 0.8, (q.text, a, prompt.text)
            else:
                n_false += 1
                assert a < 0.2, (q.text, a, prompt.text)
    assert n_true > 100 and n_false > 100


def test_question_texts():
    q = AtomicQuestion(kind="count", shape="square", n=3)
    assert q.text == "are there exactly three squares?"
    assert AtomicQuestion(kind="count", shape="circle", colour="red", n=1).text == "is there exactly one red circle?"
    assert AtomicQuestion(kind="exists", shape="circle", colour="orange").text == "is there an orange circle?"
    assert AtomicQuestion(kind="colour_of", shape="circle", colour="blue").text == "is the circle blue?"
    assert AtomicQuestion(kind="relation", shape="circle", relation="left_of",
                          other_shape="square").text == "is the circle to the left of the square?"
    with pytest.raises(ValueError, match="AtomicQuestion.relation"):
        AtomicQuestion(kind="relation", shape="circle", relation="near", other_shape="square")
    assert {q.kind for q in questions_for(generate("position", random.Random(0)).meaning)} >= {"relation"}
    assert set(RELATIONS) == set(INVERSE_RELATION)


def test_count_distribution_is_poisson_binomial():
    d = _count_distribution([0.5, 0.5])
    assert d.tolist() == [0.25, 0.5, 0.25]
    assert _count_distribution([]).tolist() == [1.0]


def test_answer_on_blank_image():
    blank = render(sample_scene(generate("single_object", random.Random(0)).meaning, random.Random(0),
                                canvas_size=32).replace_objects(()))
    assert answer(blank, AtomicQuestion(kind="count", shape="circle", n=0)) == 1.0
    assert answer(blank, AtomicQuestion(kind="exists", shape="circle")) == 0.0
