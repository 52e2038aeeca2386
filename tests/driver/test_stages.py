"""The driver's side of the stages: request streams, held-out batches, scoring and held-out metrics."""
import json

import numpy as np
import pytest

from driver.config import ConfigError, load
from driver.stages import (GroupStream, HeldoutSample, LocalReward, Scorer, heldout_metrics, heldout_requests,
                           heldout_selection, load_sources)
from reward_service.aggregate import AuditRow, RewardResult
from reward_service.scoring import ScoreResult
from worlds.files import ShuffledStream
from worlds.records import PromptRecord


def _records(n, category=lambda i: f"c{i % 2}", world=""):
    return [PromptRecord(id=f"p{i}", text=f"prompt {i}", category=category(i), world=world) for i in range(n)]


def test_group_stream_numbers_requests_and_seeds_them_from_the_run_seed():
    a = GroupStream(ShuffledStream(_records(5), seed=3), group_size=4, base_seed=3)
    b = GroupStream(ShuffledStream(_records(5), seed=3), group_size=4, base_seed=3)
    ra = [a.next_request(policy_version=v) for v in range(12)]
    rb = [b.next_request(policy_version=v) for v in range(12)]
    assert [r.prompt.id for r in ra] == [r.prompt.id for r in rb]
    assert [r.index for r in ra] == list(range(12)) and [r.policy_version for r in ra] == list(range(12))
    assert [r.seed for r in ra] == [3 * 1_000_003 + i for i in range(12)]
    assert {r.group_size for r in ra} == {4}
    assert sorted(r.prompt.id for r in ra[:5]) == [f"p{i}" for i in range(5)]      # one epoch: each prompt once


def test_heldout_selection_and_batches_are_fixed_per_image_and_batch():
    prompts = _records(9, category=lambda i: "ab"[i % 2])
    assert [p.id for p in heldout_selection(prompts, 2)] == ["p0", "p1", "p2", "p3"]
    assert heldout_selection(prompts, 0) == prompts
    cfg = load(["eval.prompts_per_category=3", "eval.images_per_prompt=2", "eval.batch_size=4"])
    reqs = heldout_requests(prompts, cfg.eval, policy_version=5)
    chosen = [p.id for p in heldout_selection(prompts, 3)]
    assert [r.index for r in reqs] == list(range(len(reqs)))
    assert [[p.id for p in r.prompts] for r in reqs] == [chosen[:4], chosen[4:]] * 2
    assert [r.seed for r in reqs] == [0, 4, 1000, 1004] and {r.policy_version for r in reqs} == {5}


def _result(reward, rows):
    audit = RewardResult(reward=reward, semantic_mean=reward, quality_mean=1.0, mode="geometric", parent_rule="none",
                         prompt="p", prompt_hash="h", version="v",
                         rows=tuple(AuditRow(id=f"q{i}", text="?", kind="semantic", category=c, parents=(), score=e,
                                             effective=e) for i, (c, e) in enumerate(rows)))
    return ScoreResult(key="k", reward=reward, audit=audit, verifier="test")


class _Judge:
    def __call__(self, images, prompt):
        raise AssertionError("not called by heldout_metrics")

    def summary(self, verdicts):
        verdicts = list(verdicts)
        return {"acc": sum(ok for _, ok in verdicts) / len(verdicts), "n": float(len(verdicts))}


def test_heldout_metrics_by_hand():
    a, b = PromptRecord(id="a", text="a", category="x", world="w"), PromptRecord(id="b", text="b", category="y")
    samples = [HeldoutSample(prompt=a, result=_result(0.8, [("Count", 0.9), ("spatial", 0.2)]), judged=True, plan=""),
               HeldoutSample(prompt=a, result=_result(0.4, [("count", 0.3)]), judged=False, plan=""),
               HeldoutSample(prompt=b, result=_result(0.6, [("spatial", 0.7), ("count", 0.51)]), judged=None, plan="")]
    m = heldout_metrics(samples, {"w": _Judge()})
    assert m["reward/mean"] == pytest.approx(0.6) and m["reward/x"] == pytest.approx(0.6) and m["reward/y"] == 0.6
    assert m["pass/count"] == pytest.approx(2 / 3) and m["pass/spatial"] == 0.5 and m["pass/all"] == pytest.approx(3 / 5)
    assert m["judge/acc"] == 0.5 and m["judge/n"] == 2.0          # only the world's prompts, only judged ones
    assert not any(k.startswith("plan/") for k in m)                # this judge cannot read plans


class _PlanJudge(_Judge):
    def plan_is_right(self, plan, prompt):
        return plan == "right"


def test_plan_metrics_split_failures_into_the_plan_and_the_drawing():
    a = PromptRecord(id="a", text="a", category="x", world="w")
    s = lambda plan, ok: HeldoutSample(prompt=a, result=_result(0.5, [("count", 0.5)]), judged=ok, plan=plan)  # noqa
    m = heldout_metrics([s("right", True), s("right", False), s("right", True), s("wrong", False)], {"w": _PlanJudge()})
    assert m["plan/x"] == 0.75 and m["follows/x"] == pytest.approx(2 / 3)


class _CountingReward(LocalReward):
    """The real in-process reward, recording which prompts reach the decomposer."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = []

    def decompose_many(self, requests):
        self.calls.append([r.prompt for r in requests])
        return super().decompose_many(requests)


def test_scorer_decomposes_each_prompt_once_and_scores_with_audits():
    import random

    from shapes.layout import sample_scene
    from shapes.plugin import ShapesWorld
    from shapes.scene import render

    service = _CountingReward(load(["trainer.mode=sync"]))
    prompts = ShapesWorld().heldout_prompts({"families": ["colors"]})[:2]
    scorer = Scorer(service)
    img = np.asarray(render(sample_scene(prompts[0].meaning, random.Random(0), canvas_size=32)), dtype=np.uint8)
    out = scorer.score([prompts[0], prompts[1], prompts[0]], [img, img, img], key="t")
    assert service.calls == [[prompts[0].text, prompts[1].text]]
    scorer.score([prompts[1]], [img], key="t")
    assert len(service.calls) == 1                                    # cached by prompt id
    assert [r.key for r in out] == ["t/sample0", "t/sample1", "t/sample2"]
    assert out[0].reward > 0.9 and out[0].reward == out[2].reward    # drawn to prompt 0's meaning
    assert out[1].reward < out[0].reward and all(r.reward == r.audit.reward for r in out)


def test_load_sources_files_with_bad_rows_overlap_and_length(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "held.txt"
    train.write_text("\n".join(json.dumps({"prompt": p, "tag": "t"}) for p in ["a red apple", "two dogs", ""]) + "\n")
    held.write_text("a blue bench\n")
    base = ["trainer.mode=sync", f"data.train.source={train}", f"data.heldout.source={held}"]
    with pytest.raises(ValueError, match=r"train.jsonl:3: empty prompt"):
        load_sources(load(base))
    src = load_sources(load(base + ["data.on_bad_row=skip"]))
    assert src.skipped == {str(train): {"empty prompt": 1}} and src.judges == {}
    assert [r.text for r in src.heldout] == ["a blue bench"]
    assert {src.train.next().text for _ in range(2)} == {"a red apple", "two dogs"}
    held.write_text("Two  Dogs\n")                                     # the same prompt, spelled otherwise
    with pytest.raises(ValueError, match=r"train.jsonl:2: 'two dogs' is a held-out prompt \(.*held.txt:1\)"):
        load_sources(load(base + ["data.on_bad_row=skip"]))
    train.write_text(json.dumps({"prompt": "word " * 2000}) + "\n")   # cannot fit the shapes model's 1024 positions
    with pytest.raises(ValueError, match=r"train.jsonl:1: prompt of \d+ tokens is longer than the \d+"):
        load_sources(load(base))


def test_unknown_source_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"data.train.source='lego'.*registered world.*shapes"):
        load_sources(load(["trainer.mode=sync", "data.train.source=lego"]))
    with pytest.raises(ConfigError, match="data.train.source=.*no such file"):
        load_sources(load(["trainer.mode=sync", "data.train.source=missing.jsonl"]))
