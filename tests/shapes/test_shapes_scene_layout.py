"""World, scenes, rendering and layout: determinism, validation, placement guarantees."""
import random

import numpy as np
import pytest

from shapes.layout import PERP_RATIO, add_object, apart, clearly, move_object, sample_scene
from shapes.meaning import Meaning, ObjectSpec, Relation
from shapes.scene import Object, Scene, render
from shapes.world import (COLOURS, RELATIONS, SHAPES, SUPPORTED_CANVAS_SIZES, border_margin, object_gap,
                          size_range)


def _meaning(rng: random.Random) -> Meaning:
    kind = rng.randrange(3)
    if kind == 0:
        return Meaning(objects=(ObjectSpec(shape=rng.choice(SHAPES), count=rng.randint(1, 4)),))
    a, b = rng.sample(SHAPES, 2)
    rel = Relation(subject=0, relation=rng.choice(RELATIONS), object=1) if kind == 1 else None
    return Meaning(objects=(ObjectSpec(shape=a, colour="red"), ObjectSpec(shape=b)), relation=rel)


@pytest.mark.parametrize("canvas_size", SUPPORTED_CANVAS_SIZES)
def test_render_is_deterministic(canvas_size):
    for seed in range(5):
        m = _meaning(random.Random(seed))
        one = render(sample_scene(m, random.Random(seed), canvas_size=canvas_size))
        two = render(sample_scene(m, random.Random(seed), canvas_size=canvas_size))
        assert one.size == (canvas_size, canvas_size) and one.mode == "RGB"
        assert one.tobytes() == two.tobytes()


def test_render_is_white_background_with_palette_colours():
    scene = Scene(canvas_size=32, objects=(Object(shape="square", colour="blue", cx=10, cy=10, size=8),))
    arr = np.asarray(render(scene))
    assert tuple(arr[0, 0]) == (255, 255, 255)
    assert tuple(arr[10, 10]) == COLOURS["blue"]          # squares on the pixel grid are crisp


@pytest.mark.parametrize("canvas_size", SUPPORTED_CANVAS_SIZES)
def test_layout_keeps_gaps_margins_and_clear_relations(canvas_size):
    rng = random.Random(canvas_size)
    gap, m = object_gap(canvas_size), border_margin(canvas_size)
    lo, hi = size_range(canvas_size)
    for _ in range(150):
        meaning = _meaning(rng)
        scene = sample_scene(meaning, rng, canvas_size=canvas_size)
        assert sorted((o.shape for o in scene.objects)) == sorted(
            s.shape for s in meaning.objects for _ in range(s.count))
        for i, a in enumerate(scene.objects):
            assert lo <= a.size <= hi
            x0, y0, x1, y1 = a.bbox
            assert x0 >= m and y0 >= m and x1 <= canvas_size - m and y1 <= canvas_size - m
            for b in scene.objects[i + 1:]:
                assert apart(a, b, gap)
        if meaning.relation is not None:
            a, b = scene.objects[0], scene.objects[1]
            assert clearly(a, meaning.relation.relation, b, gap)


def test_add_and_move_object_respect_relations():
    rng = random.Random(0)
    base = Scene(canvas_size=48, objects=(Object(shape="circle", colour="red", cx=24, cy=24, size=10),))
    for rel in RELATIONS:
        added = add_object(base, shape="square", colour="blue", rng=rng, relation=rel, anchor=0)
        assert added is not None and clearly(added.objects[1], rel, added.objects[0], object_gap(48))
        moved = move_object(added, 1, relation="left_of" if rel != "left_of" else "right_of", anchor=0, rng=rng)
        assert moved is not None and moved.objects[0] == base.objects[0]
    assert PERP_RATIO < 0.5


def test_validation_errors_name_the_field():
    with pytest.raises(ValueError, match="Object.shape"):
        Object(shape="hexagon", colour="red", cx=5, cy=5, size=4)
    with pytest.raises(ValueError, match="Object.colour"):
        Object(shape="circle", colour="teal", cx=5, cy=5, size=4)
    with pytest.raises(ValueError, match="canvas_size"):
        Scene(canvas_size=40)
    with pytest.raises(ValueError, match=r"objects\[0\]"):
        Scene(canvas_size=32, objects=(Object(shape="circle", colour="red", cx=1, cy=5, size=8),))
    with pytest.raises(ValueError, match="overlap"):
        Meaning(objects=(ObjectSpec(shape="circle"), ObjectSpec(shape="circle", colour="red")))
    with pytest.raises(ValueError, match="relation.object"):
        Meaning(objects=(ObjectSpec(shape="circle"),), relation=Relation(subject=0, relation="above", object=1))
