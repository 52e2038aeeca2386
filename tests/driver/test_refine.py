"""Inference-time SRR (`python -m driver.refine`): refine only what the model's own reward rejects, keep
a refinement only when its own reward is higher, and never consult the judge to decide."""
import json

import numpy as np
import pytest

from driver.config import load
from driver.refine import report, run
from driver.stages import load_sources
from shapes.plugin import ShapesJudge

SMALL = ["trainer.mode=sync", "data.heldout.options={families: [colors, position]}", "eval.prompts_per_category=3",
         "eval.num_steps=4", "eval.images_per_prompt=1", "srr.think.max_new_tokens=6", "srr.flow.num_steps=4", "srr.flow.window_size=2",
         "srr.flow.window_start=[0,1]", "refine.rounds=2", "refine.batch_size=4"]


class CountingJudge(ShapesJudge):
    """The real judge, recording every image it is shown."""

    def __init__(self):
        self.seen = []

    def __call__(self, images, prompt):
        self.seen += [(prompt.id, img.tobytes()) for img in images]
        return super().__call__(images, prompt)


@pytest.mark.slow
def test_self_refinement_is_gated_by_the_own_reward_and_never_by_the_judge(tmp_path):
    cfg = load(SMALL + ["refine.threshold=1.0", f"run.out_dir={tmp_path}"])    # refine every image, twice
    sources = load_sources(cfg)
    judge = sources.judges["shapes"] = CountingJudge()
    summary = run(cfg, out_dir=tmp_path / "a", sources=sources)
    rows = [json.loads(line) for line in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and summary["prompts"] == 6
    for r in rows:
        assert r["tried"] == 2 and len(r["critiques"]) == 2 and 0 <= r["accepted"] <= 2
        assert r["final_reward"] >= r["first_reward"]                       # kept only when higher
        assert (r["final_reward"] > r["first_reward"]) == (r["accepted"] > 0)
    assert summary["reward/final"] >= summary["reward/first"] and summary["refined"] == 1.0
    # the judge saw each prompt's first and final image, once each, after the decisions: never a candidate
    assert len(judge.seen) == 2 * len(rows) and {pid for pid, _ in judge.seen} == {r["id"] for r in rows}
    assert {"judge/first", "judge/final", "judge/fixes", "judge/breaks"} <= set(summary)
    # no judge at all: the same decisions
    sources.judges.clear()
    again = run(cfg, out_dir=tmp_path / "b", sources=sources)
    assert (tmp_path / "b" / "results.jsonl").read_text() == (tmp_path / "a" / "results.jsonl").read_text()
    assert not any(k.startswith("judge/") for k in again)
    # a threshold of 0 refines nothing: final = first
    none = run(load(SMALL + ["refine.threshold=0.0"]), out_dir=tmp_path / "c", sources=sources)
    assert none["refined"] == 0.0 and none["reward/final"] == none["reward/first"]


def test_report_counts_fixes_and_breaks_by_hand():
    from driver.refine import Refined
    from shapes.plugin import ShapesWorld
    import random

    from shapes.layout import sample_scene
    from shapes.scene import render
    prompts = ShapesWorld().heldout_prompts({"families": ["colors"]})[:4]
    good = [np.asarray(render(sample_scene(p.meaning, random.Random(0), canvas_size=32)), dtype=np.uint8)
            for p in prompts]
    blank = np.full((32, 32, 3), 255, np.uint8)
    # first pass right/wrong, final right/wrong: (R, R), (W, R) fix, (R, W) break, (W, W)
    pairs = [(good[0], good[0]), (blank, good[1]), (good[2], blank), (blank, blank)]
    results = [Refined(prompt=p, first=a, first_reward=0.5, final=b, final_reward=0.6 if a is not b else 0.5,
                       accepted=int(a is not b)) for p, (a, b) in zip(prompts, pairs)]
    out = report(results, {"shapes": ShapesJudge()}, threshold=0.9)
    assert out["judge/first"] == 0.5 and out["judge/final"] == 0.5
    assert out["judge/fixes"] == 0.5 and out["judge/breaks"] == 0.5       # 1 of 2 wrong fixed, 1 of 2 right broken
    assert out["changed"] == 0.5 and out["refined"] == 1.0
