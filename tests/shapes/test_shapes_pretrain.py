"""Pretraining data, the held-out benchmark, and a short pretraining run that learns."""
import random
from collections import Counter

import pytest
import torch

from shapes.benchmark import CATEGORIES, PROMPTS_PER_CATEGORY, benchmark_prompts, is_held_out
from shapes.detect import detect
from shapes.facts import IMPLICIT_COLOUR_FACTS, IMPLICIT_COUNT_FACTS
from shapes.judge import judge
from shapes.meaning import Meaning, ObjectSpec
from shapes.pretrain import PretrainConfig, batch_loss, length_buckets, pretrain
from shapes.pretrain_data import (TASKS, ImagePart, TextPart, committed_meaning, draw_prompt, make_example,
                                  plan_text)
from shapes.prompts import generate
from shapes.scene import Object, Scene, render
from shapes.tokenizer import build_tokenizer, decode, normalise
from shapes.world import COLOUR_NAMES, MAX_COUNT
from umm.config import preset
from umm.model import UnifiedModel


def test_benchmark_is_fixed_and_never_drawn_in_training():
    bench = benchmark_prompts()
    assert bench == benchmark_prompts()                   # deterministic (cached and re-derivable)
    counts = Counter(p.family for p in bench)
    assert set(counts) == set(CATEGORIES) and set(counts.values()) == {PROMPTS_PER_CATEGORY}
    held = {normalise(p.text) for p in bench if p.family != "edit"}
    rng = random.Random(5)
    drawn = [draw_prompt(rng, canvas_size=32) for _ in range(3000)]
    assert not {normalise(p.text) for p in drawn} & held
    assert all(is_held_out(p.text, family=p.family) for p in bench if p.family != "edit")


def test_benchmark_implicit_prompts_are_stratified_by_answer():
    bench = benchmark_prompts()
    colours = Counter(p.meaning.objects[0].colour for p in bench if p.family == "implicit_color")
    counts = Counter(p.meaning.objects[0].count for p in bench if p.family == "implicit_count")
    assert colours == {c: PROMPTS_PER_CATEGORY // len(COLOUR_NAMES) for c in COLOUR_NAMES}
    assert counts == {n: PROMPTS_PER_CATEGORY // MAX_COUNT for n in range(1, MAX_COUNT + 1)}
    for family, facts in (("implicit_color", IMPLICIT_COLOUR_FACTS), ("implicit_count", IMPLICIT_COUNT_FACTS)):
        used = Counter(p.meaning.fact for p in bench if p.family == family)
        for value in {f.value for f in facts}:       # an answer's facts take turns: uses differ by <= 1
            uses = [used[f] for f in facts if f.value == value]
            assert max(uses) - min(uses) <= 1, (family, value, uses)


def test_pretraining_captions_are_skewed_like_real_data():
    rng = random.Random(0)
    drawn = [draw_prompt(rng, canvas_size=32) for _ in range(3000)]
    fam = Counter(p.family for p in drawn)
    assert fam["single_object"] + fam["colors"] > 0.5 * len(drawn)
    assert fam["position"] < 0.06 * len(drawn)
    big_counts = sum(1 for p in drawn if p.family == "counting" and p.meaning.objects[0].count >= 3)
    assert big_counts < 0.03 * len(drawn)
    assert not any(p.family.startswith("implicit") for p in drawn)   # facts only as text QA


def test_examples_are_well_formed_chat_rows():
    tok = build_tokenizer()
    rng = random.Random(1)
    for task in TASKS:
        for _ in range(20):
            ex = make_example(task, rng, tok, canvas_size=32, cfg_dropout=0.0)
            targets = [p for p in ex.parts if p.target]
            assert len(targets) == (2 if task == "t2i_think" else 1), task   # think: plan + image
            if task in ("t2i", "t2i_think", "edit"):
                assert isinstance(ex.parts[-1], ImagePart) and ex.parts[-1].target
            else:
                assert isinstance(ex.parts[-1], TextPart) and decode(tok, ex.parts[-1].ids).startswith("assistant")
            for p in ex.parts:
                if isinstance(p, TextPart):
                    assert 7 not in p.ids, decode(tok, p.ids)            # no <unk>
                else:
                    assert p.pixels.shape == (3, 32, 32) and -1 <= p.pixels.min() and p.pixels.max() <= 1
    ex = make_example("t2i_think", random.Random(2), tok, canvas_size=32, cfg_dropout=0.0)
    think = decode(tok, ex.parts[2].ids, skip_special=False)
    assert think.startswith("assistant <think>") and think.endswith("</think>")


def _think_and_image(ex):
    tok = build_tokenizer()
    think = decode(tok, ex.parts[2].ids)
    pixels = ex.parts[-1].pixels
    rgb = ((pixels.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return think, rgb


def test_committed_plans_name_the_colours_drawn_and_change_nothing_else():
    tok = build_tokenizer()
    committed = 0
    for seed in range(60):
        a = make_example("t2i_think", random.Random(seed), tok, canvas_size=32, cfg_dropout=0.0)
        b = make_example("t2i_think", random.Random(seed), tok, canvas_size=32, cfg_dropout=0.0, plans="commit")
        assert torch.equal(a.parts[-1].pixels, b.parts[-1].pixels)      # same draws, same image
        assert [x.ids for x in a.parts[:2]] == [x.ids for x in b.parts[:2]]
        restated, _ = _think_and_image(a)
        plan, rgb = _think_and_image(b)
        said = [w for w in plan.split() if w in COLOUR_NAMES]
        drawn = {d.colour for d in detect(rgb)}
        assert set(said) <= drawn, (plan, drawn)                      # the plan names only drawn colours
        if len(drawn) == 1 and len(detect(rgb)) == 1:                 # one object: its colour is in the plan
            assert said == list(drawn), (plan, drawn)
        committed += plan != restated
    assert committed >= 10                                            # colourless prompts got a colour


def test_committed_meaning_fills_a_colour_only_when_a_spec_shares_one():
    m = Meaning(objects=(ObjectSpec(shape="square", count=2), ObjectSpec(shape="circle", colour="red"),
                         ObjectSpec(shape="triangle")))

    def obj(shape, colour):
        return Object(shape=shape, colour=colour, cx=8.0, cy=8.0, size=6)
    same = Scene(canvas_size=32, objects=(obj("square", "blue"), obj("square", "blue"), obj("circle", "red"),
                                          obj("triangle", "green")))
    mixed = Scene(canvas_size=32, objects=(obj("square", "blue"), obj("square", "purple"), obj("circle", "red"),
                                           obj("triangle", "green")))
    assert [s.colour for s in committed_meaning(m, same).objects] == ["blue", "red", "green"]
    assert [s.colour for s in committed_meaning(m, mixed).objects] == [None, "red", "green"]
    assert [s.count for s in committed_meaning(m, mixed).objects] == [2, 1, 1]
    p = generate("counting", random.Random(0))
    scene = Scene(canvas_size=32, objects=tuple(obj(p.meaning.objects[0].shape, "orange")
                                                for _ in range(p.meaning.objects[0].count)))
    assert plan_text(p, scene, "restate") == p.explicit_text
    assert plan_text(p, scene, "commit").split()[:2] == [p.explicit_text.split()[0], "orange"]  # "one orange ..."
    with pytest.raises(ValueError, match="plans='vivid'"):
        plan_text(p, scene, "vivid")
    with pytest.raises(ValueError, match="plans='vivid'"):
        pretrain(PretrainConfig(steps=1, plans="vivid"), model=UnifiedModel(preset("shapes")), progress=False)


def test_length_buckets_limit_padding():
    lengths = [200, 80, 78, 82, 15, 16, 79, 199]
    buckets = length_buckets(lengths, slack=1.25)
    assert sorted(i for b in buckets for i in b) == list(range(8))
    for b in buckets:
        assert max(lengths[i] for i in b) * len(b) <= 1.25 * sum(lengths[i] for i in b)


def test_a_short_pretraining_run_lowers_both_losses():
    torch.manual_seed(0)
    model = UnifiedModel(preset("shapes"))
    tok = build_tokenizer()
    rng = random.Random(123)
    held = [make_example(t, rng, tok, canvas_size=32, cfg_dropout=0.0) for t in TASKS for _ in range(2)]

    def losses():
        with torch.no_grad():
            _, parts = batch_loss(model, held, gen=torch.Generator().manual_seed(7), ce_weight=0.25)
        return parts

    before = losses()
    cfg = PretrainConfig(steps=25, batch_size=8, warmup=5, lr=2e-3, eval_every=0, threads=1)
    _, log = pretrain(cfg, model=model, progress=False)
    after = losses()
    assert len(log) == 25 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert after["mse"] < before["mse"] and after["ce"] < 0.7 * before["ce"]


def test_judge_parses_rendered_training_targets():
    """The flow targets are real renders the judge reads (sanity of the data pipeline)."""
    rng = random.Random(3)
    from shapes.layout import sample_scene
    for _ in range(20):
        p = draw_prompt(rng, canvas_size=32)
        assert judge(render(sample_scene(p.meaning, rng, canvas_size=32)), p.meaning).correct


def test_a_resumed_run_continues_exactly(tmp_path):
    from shapes.pretrain import save_state

    def fresh():
        torch.manual_seed(0)
        return UnifiedModel(preset("shapes"))

    cfg = PretrainConfig(steps=4, batch_size=2, warmup=2, eval_every=0, threads=1,
                         task_weights=(1.0, 0.0, 0.0, 0.0, 0.0, 0.0))
    straight, _ = pretrain(cfg, model=fresh(), progress=False)

    stop = dict(eval_every=2)
    saved = {}

    def on_eval(state, step):
        save_state(state, tmp_path)
        saved["step"] = state.step
        raise KeyboardInterrupt          # the process dies right after the save

    try:
        pretrain(PretrainConfig(**{**cfg.__dict__, **stop}), model=fresh(), progress=False, on_eval=on_eval)
    except KeyboardInterrupt:
        pass
    assert saved["step"] == 3
    resumed, log = pretrain(cfg, model=fresh(), progress=False, resume_from=tmp_path)
    assert [r["step"] for r in log] == [3]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_task_weights_flag_parses_one_weight_per_task_and_names_them_on_error():
    import argparse

    from shapes.pretrain import _task_weights
    assert _task_weights("0.58,0.22,0.05,0.05,0.05,0.05") == (0.58, 0.22, 0.05, 0.05, 0.05, 0.05)
    for bad in ("1,2", "1,1,1,1,1,x", "1,1,1,1,1,-1", "0,0,0,0,0,0"):
        with pytest.raises(argparse.ArgumentTypeError, match="t2i|not a list"):
            _task_weights(bad)
