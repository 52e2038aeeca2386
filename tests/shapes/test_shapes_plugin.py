"""The shapes world behind the trainer's interfaces: its prompt stream, held-out set, judge and tokenizer."""
import json

import numpy as np
import pytest

from shapes.benchmark import benchmark_prompts, is_held_out
from shapes.plugin import ShapesJudge, ShapesWorld, TEXT_TO_IMAGE
from shapes.tokenizer import ShapesTokenizer, build_tokenizer, decode, encode
from worlds.config import DataConfigError
from worlds.records import normalised

SHIPPED = "checkpoints/shapes-base"


def test_stream_is_seeded_never_held_out_and_resumes_exactly():
    world = ShapesWorld()
    fams = ["single_object", "counting", "implicit_color"]
    a, b = world.train_source({"families": fams}, seed=3), world.train_source({"families": fams}, seed=3)
    ra, rb = [a.next() for _ in range(200)], [b.next() for _ in range(200)]
    assert [r.text for r in ra] == [r.text for r in rb]
    assert not any(is_held_out(r.text, family=r.category) for r in ra)
    assert {r.category for r in ra} == set(fams) and {r.world for r in ra} == {"shapes"}
    assert all(r.meaning is not None and r.metadata["explicit_text"] for r in ra)
    state = json.loads(json.dumps(a.state()))
    c = world.train_source({"families": fams}, seed=99)
    c.restore(state)
    assert [c.next().text for _ in range(20)] == [a.next().text for _ in range(20)]
    # texts the run holds out (e.g. a held-out prompt file) are redrawn too
    ban = frozenset(normalised(r.text) for r in ra[:50])
    d = world.train_source({"families": fams}, seed=3, exclude=ban)
    assert not any(normalised(d.next().text) in ban for _ in range(100)) and d.redrawn > 0


def test_a_family_whose_every_text_is_held_out_is_refused_instead_of_redrawn_forever():
    texts = {p.text for p in benchmark_prompts() if p.family == "two_objects"}
    assert len(texts) == 24                                 # the family's whole space of texts
    with pytest.raises(DataConfigError, match="'two_objects' has no prompt to train on"):
        ShapesWorld().train_source({"families": ["implicit_color", "two_objects"]}, seed=0)
    # a run-level exclusion that covers a family's remaining texts is refused the same way
    rest = {normalised(ShapesWorld().train_source({"families": ["single_object"]}, seed=s).next().text)
            for s in range(2000)}
    with pytest.raises(DataConfigError, match="'single_object' has no prompt"):
        ShapesWorld().train_source({"families": ["single_object"]}, seed=0, exclude=frozenset(rest))


def test_heldout_is_shapes_geneval_without_edits_and_options_are_checked():
    held = ShapesWorld().heldout_prompts({})
    bench = [p for p in benchmark_prompts() if p.family != "edit"]
    assert [r.id for r in held] == [p.id for p in bench] and {r.category for r in held} == set(TEXT_TO_IMAGE)
    assert [r.category for r in ShapesWorld().heldout_prompts({"families": ["colors"]})] == ["colors"] * 24
    with pytest.raises(DataConfigError, match=r"data.train.options.families\[1\]='edit'"):
        ShapesWorld().train_source({"families": ["colors", "edit"]}, seed=0)
    with pytest.raises(DataConfigError, match=r"data.heldout.options: unknown \['famlies'\]"):
        ShapesWorld().heldout_prompts({"famlies": ["colors"]})


def test_judge_is_the_strict_judge_and_its_summary_the_geneval_mean():
    from shapes.evaluate import accuracy
    from shapes.judge import judge
    from shapes.layout import sample_scene
    from shapes.scene import render
    import random
    held = ShapesWorld().heldout_prompts({"families": ["colors", "position"]})[::20]
    images = np.stack([np.asarray(render(sample_scene(r.meaning, random.Random(i), canvas_size=32)), dtype=np.uint8)
                       for i, r in enumerate(held)])
    verdicts = [ShapesJudge()(images[i:i + 1], r)[0] for i, r in enumerate(held)]
    assert verdicts == [judge(img, r.meaning).correct for img, r in zip(images, held)] and any(verdicts)
    pairs = [(r.category, v) for r, v in zip(held, verdicts)]
    assert ShapesJudge().summary(pairs) == accuracy(pairs)


def test_tokenizer_plugin_is_the_worlds_tokenizer_behind_the_interface():
    from umm.prompting import Prompter
    from umm.tokenizer import load_tokenizer, special_tokens
    tok = load_tokenizer(SHIPPED)
    assert isinstance(tok, ShapesTokenizer) and tok.source.endswith("shapes-base/tokenizer.json")
    raw = build_tokenizer()
    text = "a circle the colour of a banana, 3 squares."
    assert tok.encode(text) == encode(raw, text) and tok.decode(tok.encode(text)) == decode(raw, encode(raw, text))
    assert tok.decode([5, 9999]) == decode(raw, [5, 7])                 # past the vocabulary: <unk>
    ids = special_tokens(tok)
    assert (ids.pad, ids.bos, ids.eos, ids.start_of_image, ids.end_of_image) == (0, 1, 2, 3, 4)
    p = Prompter.from_checkpoint(SHIPPED)                              # role words, the world's wording
    d = p.draw("a red circle", think=True)
    assert d.prefix[0].ids == tuple([raw.token_to_id("system")] + encode(raw, "think, then draw."))
    assert d.text.ids == tuple([raw.token_to_id("user")] + encode(raw, "a red circle"))
