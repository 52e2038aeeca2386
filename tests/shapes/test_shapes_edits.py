"""Edits: the rendered target satisfies the target meaning and the rendered source does not."""
import random
from collections import Counter

import pytest

from shapes.edits import EDIT_KINDS, make_edit, referent
from shapes.judge import judge
from shapes.layout import sample_scene
from shapes.prompts import GENEVAL_FAMILIES, generate
from shapes.scene import Object, Scene, render
from shapes.world import SUPPORTED_CANVAS_SIZES


@pytest.mark.parametrize("canvas_size", SUPPORTED_CANVAS_SIZES)
def test_target_satisfies_and_source_does_not(canvas_size):
    rng = random.Random(canvas_size)
    kinds = Counter()
    for i in range(48):
        family = GENEVAL_FAMILIES[i % len(GENEVAL_FAMILIES)]
        meaning = generate(family, rng).meaning
        if meaning.objects[0].count == 4:
            continue
        source = sample_scene(meaning, rng, canvas_size=canvas_size)
        try:
            edit = make_edit(source, rng, kinds=(EDIT_KINDS[i % 4],))
        except RuntimeError:         # e.g. nothing can be referred to uniquely
            continue
        kinds[edit.kind] += 1
        assert edit.source == source and edit.meaning.source == source
        assert judge(render(edit.target), edit.meaning).correct, edit.instruction
        assert not judge(render(edit.source), edit.meaning).correct, edit.instruction
        # a fresh completion of the edit meaning (what a model could draw) is also correct
        assert judge(render(sample_scene(edit.meaning, rng, canvas_size=canvas_size)), edit.meaning).correct
    assert set(kinds) == set(EDIT_KINDS), kinds


def test_instructions_and_referents():
    red = Object(shape="circle", colour="red", cx=8, cy=8, size=8)
    blue = Object(shape="circle", colour="blue", cx=24, cy=8, size=8)
    sq = Object(shape="square", colour="red", cx=8, cy=24, size=8)
    scene = Scene(canvas_size=32, objects=(red, blue, sq))
    assert [referent(scene, i) for i in range(3)] == ["red circle", "blue circle", "square"]
    edit = make_edit(scene, random.Random(0), kinds=("remove",))
    assert edit.instruction.split()[-1] in ("circle", "square") and len(edit.target.objects) == 2
    twins = Scene(canvas_size=32, objects=(red, red.moved(cx=24, cy=24)))
    with pytest.raises(RuntimeError, match="no feasible edit"):
        make_edit(twins, random.Random(0), kinds=("recolour", "remove", "move"))


def test_moved_preserved_object_fails():
    rng = random.Random(5)
    source = sample_scene(generate("color_attr", rng).meaning, rng, canvas_size=48)
    edit = make_edit(source, rng, kinds=("recolour",))
    objs = list(edit.target.objects)
    objs[0] = objs[0].moved(cx=48 - objs[0].cx, cy=48 - objs[0].cy)    # mirrored through the centre
    verdict = judge(render(edit.target.replace_objects(tuple(objs))), edit.meaning)
    assert not verdict.correct and any(c.kind == "preserve" and not c.passed for c in verdict.clauses)
