"""The programmatic judge: detection, strict verdicts on ground truth and on negatives."""
import random

import numpy as np
import pytest

from shapes.detect import detect, template
from shapes.judge import judge
from shapes.layout import sample_scene
from shapes.meaning import Meaning, ObjectSpec, Relation
from shapes.measure_judge import measure
from shapes.negatives import NEGATIVE_KINDS, corrupt
from shapes.prompts import FAMILIES, generate
from shapes.relations import geneval_relations, relation_prob
from shapes.scene import Object, Scene, render
from shapes.world import COLOUR_NAMES, SHAPES, SUPPORTED_CANVAS_SIZES, size_range

PER_FAMILY = 19          # 9 families x 3 canvas sizes x 19 = 513 ground-truth images


@pytest.fixture(scope="module")
def reports():
    return {size: measure(canvas_size=size, per_family=PER_FAMILY, seed=size) for size in SUPPORTED_CANVAS_SIZES}


def test_ground_truth_is_judged_correct(reports):
    judged = sum(sum(r.total.values()) for r in reports.values())
    correct = sum(sum(r.correct.values()) for r in reports.values())
    assert judged >= 500
    assert all(set(r.total) == set(FAMILIES) for r in reports.values())
    assert correct / judged >= 0.99, [r.failures[:3] for r in reports.values()]


def test_negatives_are_rejected(reports):
    for kind in NEGATIVE_KINDS:
        n = sum(r.negatives[kind] for r in reports.values())
        rejected = sum(r.rejected[kind] for r in reports.values())
        assert n >= 20, kind
        assert rejected / n >= 0.99, (kind, rejected, n)


@pytest.mark.parametrize("canvas_size", SUPPORTED_CANVAS_SIZES)
def test_every_shape_colour_and_size_is_recognised(canvas_size):
    rng = random.Random(canvas_size)
    lo, hi = size_range(canvas_size)
    for size in (lo, (lo + hi) // 2, hi):
        for shape in SHAPES:
            for colour in COLOUR_NAMES:
                x0, y0 = rng.randint(2, canvas_size - 2 - size), rng.randint(2, canvas_size - 2 - size)
                obj = Object(shape=shape, colour=colour, cx=x0 + size / 2, cy=y0 + size / 2, size=size)
                (d,) = detect(render(Scene(canvas_size=canvas_size, objects=(obj,))))
                assert (d.shape, d.colour) == (shape, colour)
                assert d.confidence > 0.9
                assert abs(d.center[0] - obj.cx) <= 1 and abs(d.center[1] - obj.cy) <= 1


def test_unknown_ink_and_merged_blobs_are_not_world_objects():
    arr = np.full((32, 32, 3), 255, dtype=np.uint8)
    arr[4:12, 4:12] = (0, 0, 0)                       # black: no palette colour
    arr[20:28, 4:28] = (220, 30, 30)                  # a 3:1 red bar: no world shape
    dets = sorted(detect(arr), key=lambda d: d.center[1])
    assert dets[0].colour is None and dets[1].shape is None and dets[1].colour == "red"
    verdict = judge(arr, Meaning(objects=(ObjectSpec(shape="square"),)))
    assert not verdict.correct


@pytest.mark.parametrize("fill", [(128, 128, 128), (220, 30, 30)])
def test_a_filled_canvas_is_background_not_a_canvas_sized_square(fill):
    arr = np.full((32, 32, 3), fill, dtype=np.uint8)
    assert detect(arr) == []
    assert not judge(arr, Meaning(objects=(ObjectSpec(shape="square"),))).correct
    arr[8:24, 8:24] = 255                             # a frame touching all four edges: still not an object
    assert detect(arr) == []
    inset = np.full((32, 32, 3), 255, dtype=np.uint8)
    inset[1:31, 1:31] = fill                          # one white pixel of margin: a (huge) square
    assert [d.shape for d in detect(inset)] == ["square"]


def test_verdict_lists_its_clauses():
    meaning = Meaning(objects=(ObjectSpec(shape="circle", colour="red"), ObjectSpec(shape="square")),
                      relation=Relation(subject=0, relation="left_of", object=1))
    scene = sample_scene(meaning, random.Random(0), canvas_size=32)
    v = judge(render(scene), meaning)
    assert v.correct and [c.kind for c in v.clauses] == ["count", "count", "no_extras", "relation"]
    swapped = corrupt(scene, meaning, "swapped_relation", random.Random(0))
    bad = judge(render(swapped), meaning)
    assert not bad.correct and [c.kind for c in bad.clauses if not c.passed] == ["relation"]


def test_stray_specks_are_counted_but_do_not_fail():
    meaning = Meaning(objects=(ObjectSpec(shape="triangle", colour="green"),))
    scene = sample_scene(meaning, random.Random(1), canvas_size=48)
    arr = np.array(render(scene))
    bg = np.argwhere((arr == 255).all(-1))
    for y, x in bg[:: len(bg) // 3][:3]:
        arr[y, x] = (30, 70, 220)
    v = judge(arr, meaning)
    assert v.correct and v.stray_blobs == 3


def test_geneval_relation_rule():
    a, b = (0, 0, 10, 10), (20, 2, 30, 12)
    assert geneval_relations(a, b) == {"left_of"} and geneval_relations(b, a) == {"right_of"}
    assert geneval_relations((0, 0, 10, 10), (1, 1, 11, 11)) == set()
    assert geneval_relations((0, 0, 10, 10), (20, 20, 30, 30)) == {"left_of", "above"}
    assert relation_prob(a, "left_of", b) > 0.95 and relation_prob(a, "right_of", b) < 0.01


def test_templates_have_the_expected_fill_ratios():
    assert template("square", 9, 9).mean() == 1.0
    assert 0.7 < template("circle", 31, 31).mean() < 0.85
    assert 0.4 < template("triangle", 31, 31).mean() < 0.6
