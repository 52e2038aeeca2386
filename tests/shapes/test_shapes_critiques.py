"""shapes.critiques: what kind of text a reflection wrote, on texts whose kind is known by construction."""
import random

import pytest

from shapes.critiques import EDIT_VERBS, critique_kind
from shapes.edits import make_edit
from shapes.layout import sample_scene
from shapes.prompts import generate
from shapes.pretrain_data import scene_caption


def _scenes(n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        p = generate("two_objects", rng, canvas_size=32)
        try:
            out.append(sample_scene(p.meaning, rng, canvas_size=32))
        except RuntimeError:
            continue
    return out, rng


def test_every_edit_the_world_can_write_is_an_instruction_and_every_caption_a_description():
    scenes, rng = _scenes(40)
    for scene in scenes:
        instruction = make_edit(scene, rng).instruction
        caption = scene_caption(scene)
        assert critique_kind(f"assistant {instruction}") == "instruction", instruction
        assert critique_kind(f"assistant <think> {caption} </think> {instruction}") == "instruction"
        assert critique_kind(f"assistant {caption}") == "description", caption
        assert critique_kind(caption) == "description"


@pytest.mark.parametrize("text,kind", [
    ("assistant yes", "answer"), ("no", "answer"), ("assistant <think> no </think>", "answer"),
    ("assistant", "other"), ("", "other"), ("assistant the", "other"),
    ("assistant yes a red circle", "description"),
    # an edit verb counts only where a clause starts: a description that goes on is not an instruction
    ("a red circle and make", "description"),
])
def test_kinds_of_fixed_texts(text, kind):
    assert critique_kind(text) == kind


def test_edit_verbs_are_the_first_words_of_the_worlds_edit_templates():
    assert {"make", "add", "remove", "move", "paint"} <= EDIT_VERBS
    assert not {"a", "the", "yes", "no", "circle"} & EDIT_VERBS


def test_the_world_judge_reads_critiques_for_the_driver():
    from shapes.plugin import ShapesJudge
    judge = ShapesJudge()
    assert [judge.critique_kind(t) for t in ("assistant yes", "a red circle", "make the circle blue", "the")] == \
        ["answer", "description", "instruction", "other"]
    from worlds.base import CRITIQUE_KINDS
    assert sorted(CRITIQUE_KINDS) == ["answer", "description", "instruction", "other"]   # the interface's words
