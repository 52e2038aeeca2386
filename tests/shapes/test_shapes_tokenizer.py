"""The world tokenizer: fixed special ids, exact round trips, <unk>, save/load, determinism."""
import random

import pytest

from shapes.edits import make_edit
from shapes.facts import FACTS
from shapes.layout import sample_scene
from shapes.prompts import FAMILIES, generate
from shapes.questions import questions_for
from shapes.tokenizer import (IM_END_ID, IM_START_ID, SPECIAL_IDS, UNK_ID, build_tokenizer, decode, encode,
                              encode_turn, load, normalise, save, vocabulary)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _texts():
    rng = random.Random(0)
    for i in range(1800):
        p = generate(FAMILIES[i % len(FAMILIES)], rng)
        yield p.text
        yield p.explicit_text
        if i % 9 == 0:
            yield from (q.text for q in questions_for(p.meaning))
    for f in FACTS:
        yield f.question
        yield f.answer


def test_special_ids_are_fixed(tok):
    expected = {"<pad>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|vision_start|>": 3, "<|vision_end|>": 4,
                "<think>": 5, "</think>": 6, "<unk>": 7}
    assert SPECIAL_IDS == expected
    assert all(tok.token_to_id(s) == i for s, i in expected.items())
    assert [tok.token_to_id(r) for r in ("system", "user", "assistant")] == [8, 9, 10]
    assert tok.get_vocab_size() < 512


def test_round_trip_on_generated_texts(tok):
    n = 0
    for text in _texts():
        ids = encode(tok, text)
        assert UNK_ID not in ids, text
        assert decode(tok, ids) == normalise(text), text
        n += 1
    assert n > 3000


def test_unknown_words_and_specials(tok):
    ids = encode(tok, "a Zebra circle")
    assert ids[1] == UNK_ID and decode(tok, ids) == "a <unk> circle"
    ids = encode(tok, "<think>a red circle, 12 squares.</think>")
    assert ids[0] == SPECIAL_IDS["<think>"] and ids[-1] == SPECIAL_IDS["</think>"]
    assert decode(tok, ids) == "a red circle, 12 squares."
    turn = encode_turn(tok, "user", "a red circle")
    assert turn[0] == IM_START_ID and turn[-1] == IM_END_ID and decode(tok, turn) == "user a red circle"
    with pytest.raises(ValueError, match="role='robot'"):
        encode_turn(tok, "robot", "hi")


def test_save_load_and_determinism(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    save(tok, path)
    again = load(path)
    assert again.to_str() == tok.to_str() == build_tokenizer().to_str()
    extra = build_tokenizer(extra_words=("hello",))
    assert extra.token_to_id("hello") == tok.get_vocab_size()
    assert vocabulary(("hello",))[:-1] == vocabulary()
    with pytest.raises(ValueError, match="extra_words"):
        build_tokenizer(extra_words=("two words",))


def test_edit_instructions_round_trip(tok):
    rng = random.Random(3)
    for _ in range(100):
        scene = sample_scene(generate("color_attr", rng).meaning, rng, canvas_size=32)
        text = make_edit(scene, rng).instruction
        assert decode(tok, encode(tok, text)) == normalise(text)
