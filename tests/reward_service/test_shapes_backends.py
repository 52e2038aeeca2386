"""The shapes decomposer and verifier end to end: exact questions, meaning JSON, real quality scores."""
import random

import numpy as np
import pytest
from PIL import Image

from reward_service.backends import shapes_decomposer
from reward_service.backends.shapes_meaning_json import canonical, meaning_from_dict, meaning_from_json, \
    meaning_to_dict
from reward_service.backends.shapes_verifier import ShapesVerifier, answer_set
from reward_service.reward import DVReward, RewardConfig
from reward_service.schema import Question, QuestionSet
from shapes.layout import sample_scene
from shapes.meaning import Meaning, ObjectSpec
from shapes.prompts import FAMILIES, generate
from shapes.questions import AtomicQuestion, questions_for
from shapes.scene import render


def _prompts(n_per_family=6, seed=0, canvas_size=32):
    rng = random.Random(seed)
    return [(generate(f, rng, canvas_size=canvas_size), rng) for f in FAMILIES for _ in range(n_per_family)]


def test_semantic_atoms_are_exactly_questions_for_the_meaning():
    for prompt, _ in _prompts():
        qs = shapes_decomposer.decompose(prompt.text, meaning=prompt.meaning)
        atomic = [AtomicQuestion(**q.atom) for q in qs.semantic if q.atom["kind"] not in ("only", "stays")]
        assert tuple(atomic) == questions_for(prompt.meaning), prompt.text
        assert [q.text for q in qs.semantic[:len(atomic)]] == [a.text for a in atomic]
        assert {q.category for q in qs.quality} == {"geometry", "coherence", "texture"}
        assert any(q.category == "negative" for q in qs.semantic)
        assert len([q for q in qs.semantic if q.atom["kind"] == "stays"]) == len(prompt.meaning.preserve)
        assert qs.version == shapes_decomposer.VERSION and qs.prompt == prompt.text
        assert QuestionSet.from_json(qs.to_json()) == qs


def test_parents_follow_the_dsg_structure():
    prompt = generate("position", random.Random(3))
    qs = shapes_decomposer.decompose(prompt.text, meaning=prompt.meaning)
    by_id = {q.id: q for q in qs.questions}
    assert by_id["c0"].parents == ("e0",) and by_id["r"].parents == ("e0", "e1") and by_id["n"].parents == ("e0", "e1")
    assert by_id["r"].text.startswith("is the ") and by_id["r"].category == "spatial"


def test_meaning_json_round_trips_for_every_family():
    for prompt, _ in _prompts(n_per_family=4, seed=1):
        text = canonical(prompt.meaning)
        assert meaning_from_json(text) == prompt.meaning, prompt.text
        assert canonical(meaning_from_json(text)) == text


def test_the_key_depends_on_the_meaning_not_only_the_text():
    a = Meaning(objects=(ObjectSpec(shape="circle", colour="blue"),))
    b = Meaning(objects=(ObjectSpec(shape="circle", colour="red"),))
    ka = shapes_decomposer.decompose("make the circle blue", meaning=a).prompt_hash
    kb = shapes_decomposer.decompose("make the circle blue", meaning=b).prompt_hash
    assert ka != kb


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["objects"][0].update(shape="hexagon"), r"meaning.objects\[0\]: ObjectSpec.shape='hexagon'"),
    (lambda d: d["objects"][0].update(size=3), r"meaning.objects\[0\]: .*size"),
    (lambda d: d.update(relation={"subject": 0, "relation": "near", "object": 1}), "meaning.relation"),
    (lambda d: d.update(objects=[]), "at least one object spec"),
    (lambda d: d.update(colour="red"), "unknown keys"),
    (lambda d: d.update(objects="circle"), "meaning.objects: expected a list"),
])
def test_bad_meanings_name_the_key(mutate, match):
    d = meaning_to_dict(generate("position", random.Random(0)).meaning)
    mutate(d)
    with pytest.raises(ValueError, match=match):
        meaning_from_dict(d)


def test_correct_renders_score_high_for_every_family():
    dv = DVReward(ShapesVerifier(), config=RewardConfig(parent_rule="zero"))
    for prompt, rng in _prompts(n_per_family=4, seed=2):
        qs = shapes_decomposer.decompose(prompt.text, meaning=prompt.meaning)
        result = dv.score(render(sample_scene(prompt.meaning, rng, canvas_size=32)), qs)
        assert result.reward > 0.9 and result.strict_pass(), result.table()
        assert [r.id for r in result.rows] == [q.id for q in qs.questions]


@pytest.mark.parametrize("family", ["single_object", "colors", "two_objects", "counting"])
def test_drawing_nothing_never_beats_drawing_something(family):
    """An empty or uniformly filled canvas scores 0 under the scaled/zeroed parent rule; under "none"
    (the released code) the empty canvas still passes the negative and quality questions."""
    prompt = generate(family, random.Random(7), canvas_size=32)
    qs = shapes_decomposer.decompose(prompt.text, meaning=prompt.meaning)
    empty, grey = (Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (255, 128))
    correct = render(sample_scene(prompt.meaning, random.Random(7), canvas_size=32))
    for rule in ("scale", "zero"):
        dv = DVReward(ShapesVerifier(), config=RewardConfig(parent_rule=rule))
        assert dv.score(empty, qs).reward == 0.0 and dv.score(grey, qs).reward == 0.0, rule
        assert dv.score(correct, qs).reward > 0.9
    loose = DVReward(ShapesVerifier(), config=RewardConfig(parent_rule="none")).score(empty, qs)
    assert loose.reward > 0.3 and {r.id: r.score for r in loose.rows}["n"] == 1.0


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Stray specks and a noisy, tinted background: what quality questions should catch."""
    a = np.asarray(image).astype(np.float64)
    background = (a > 250).all(-1)
    a[background] -= rng.uniform(10, 40, size=(background.sum(), 1)) * np.array([1.0, 0.6, 0.2])
    for _ in range(5):
        y, x = rng.integers(0, a.shape[0] - 1, size=2)
        a[y:y + 2, x:x + 2] = (90, 90, 90)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def test_quality_half_is_measured_from_the_image():
    prompt = generate("color_attr", random.Random(4))
    qs = shapes_decomposer.decompose(prompt.text, meaning=prompt.meaning)
    clean = render(sample_scene(prompt.meaning, random.Random(4), canvas_size=32))
    dirty = _degrade(clean, np.random.default_rng(0))
    dv = DVReward(ShapesVerifier())
    r_clean, r_dirty = dv.score(clean, qs), dv.score(dirty, qs)
    assert r_clean.quality_mean > 0.95 and r_dirty.quality_mean < 0.6
    dirty_q = {r.category: r.score for r in r_dirty.rows if r.kind == "quality"}
    assert dirty_q["coherence"] < 0.5 and dirty_q["texture"] < 0.5, dirty_q
    assert r_dirty.reward < r_clean.reward


def test_questions_without_shapes_atoms_are_refused_by_name():
    prompt = generate("single_object", random.Random(0))
    qs = shapes_decomposer.decompose(prompt.text, meaning=prompt.meaning)
    llm_like = QuestionSet(prompt=qs.prompt, prompt_hash=qs.prompt_hash, version=qs.version,
                           questions=qs.questions + (Question(id="x1", text="is it pretty?", kind="quality",
                                                              category="aesthetics"),))
    image = render(sample_scene(prompt.meaning, random.Random(0), canvas_size=32))
    with pytest.raises(ValueError, match="question 'x1' .*no shapes atom"):
        answer_set(image, llm_like)
    bad_atom = QuestionSet(prompt="p", prompt_hash="h", version=qs.version,
                           questions=(Question(id="c", text="count?", kind="semantic", category="count",
                                               atom={"kind": "count", "shape": "circle", "n": 9}),))
    with pytest.raises(ValueError, match="question 'c' .*AtomicQuestion.n=9"):
        answer_set(image, bad_atom)
