"""The Ray pipeline end to end on a local cluster: 2 ZeRO-3 learner ranks, 2 rollout actors,
shapes reward pools. Small sampler settings keep it to a few minutes on 2 cores."""
import math
from pathlib import Path

import pytest

from driver.config import load
from driver.sync import train_sync

ray = pytest.importorskip("ray")

SMALL = ["policy.flow.num_steps=4", "policy.flow.window_size=2", "policy.think.max_new_tokens=6",
         "data.group_size=4", "trainer.groups_per_step=2", "eval.enabled=false", "trainer.drop_zero_variance=false",
         "pools.rollout.num=2", "pools.learner.world_size=2", "pools.learner.zero_stage=3", "run.seed=5"]


def run_pipeline(overrides, *, on_step=None, after=None):
    """Run; `after(pipe)` is called before the pipeline shuts down."""
    from driver.pipeline import Pipeline
    pipe = Pipeline(load(SMALL + overrides))
    try:
        result = pipe.run(on_step=on_step)
        if after is not None:
            after(pipe)
        return pipe, result
    finally:
        pipe.shutdown()


def test_pipeline_trains_and_every_actor_holds_the_learners_weights(ray_cluster, tmp_path):
    import numpy as np

    from actors.rollout import StaleWeightsError
    from actors.weight_sync import model_checksum
    from grpo.groups import RefineRequest
    from grpo.loading import load_policy
    from shapes.plugin import record
    from shapes.prompts import generate
    seen, refined = [], []

    def check(pipe, rec):
        learner, actors = pipe.checksums()
        seen.append((rec.policy_version, learner, actors))
        # the refine actor draws edits with the version it was just sent, and refuses any other
        prompt = generate("edit", __import__("random").Random(rec.step), canvas_size=32)
        req = RefineRequest(index=rec.step, prompt=record(prompt), source=np.zeros((32, 32, 3), np.uint8),
                            instruction=prompt.text, group_size=2, seed=rec.step, policy_version=rec.policy_version)
        meta_ref, _, *image_refs = pipe.refiners[0].refine.options(num_returns=4).remote(req)
        refined.append((ray.get(meta_ref).policy_version, [ray.get(r).shape for r in image_refs]))
        stale = RefineRequest(**{**req.__dict__, "policy_version": rec.policy_version - 1})
        with pytest.raises(StaleWeightsError, match="RefineWorker 0: asked for policy"):
            ray.get(pipe.refiners[0].refine.options(num_returns=4).remote(stale)[0])

    saved = []
    pipe, result = run_pipeline(["trainer.steps=2", "pools.refine.num=1"], on_step=check,
                                after=lambda p: saved.append((p.checksums()[0], p.save_policy(tmp_path / "policy"))))
    assert [r.policy_version for r in result.steps] == [1, 2]
    for r in result.steps:
        assert math.isfinite(r.loss) and math.isfinite(r.reward_mean) and 0 <= r.judge_acc <= 1
    for version, learner, actors in seen:   # 2 rollout actors, then the refine actor
        assert actors == [learner, learner, learner], f"after v{version}: learner {learner:#x}, actors {actors}"
    assert refined == [(1, [(32, 32, 3)] * 2), (2, [(32, 32, 3)] * 2)]
    assert seen[0][1] != seen[1][1]                       # the weights did change between steps
    assert [s.version for s in pipe.slots] == [2, 2]
    # the trained policy is saved as a checkpoint that loads back to the learner's weights
    final, policy_dir = saved[0]
    assert final == seen[-1][1] and (policy_dir / "tokenizer.json").exists()
    assert (policy_dir / "prompt_format.json").read_text() == (Path(pipe.cfg.policy.checkpoint) / "prompt_format.json").read_text()
    reloaded = load_policy(load(SMALL + [f"policy.checkpoint={policy_dir}"]).policy)
    assert model_checksum(reloaded, bucket_bytes=int(pipe.cfg.pools.learner.bucket_mb * (1 << 20))) == final


def test_sync_mode_and_pipeline_agree_on_the_first_step(ray_cluster, tmp_path):
    import torch

    from umm.checkpoint import load_pretrained

    # the held-out evaluation too: the pipeline deals its 2 images per prompt out to the 2 rollout actors
    ev = ["eval.enabled=true", "eval.prompts_per_category=1", "eval.images_per_prompt=2", "eval.num_steps=3"]
    _, piped = run_pipeline(["trainer.steps=1", "trainer.max_staleness=0", *ev],
                            after=lambda p: p.save_policy(tmp_path / "piped"))
    alone = train_sync(load(SMALL + ["trainer.steps=1", "trainer.mode=sync", *ev]), save_to=tmp_path / "alone")
    assert piped.before == alone.before and "judge/geneval_mean" in piped.before and "pass/all" in piped.before
    a, b = piped.steps[0], alone.steps[0]
    assert a.reward_mean == pytest.approx(b.reward_mean, abs=1e-6)
    assert a.reward_std == pytest.approx(b.reward_std, abs=1e-6)
    assert a.judge_acc == b.judge_acc and a.question_pass == b.question_pass and a.question_pass
    assert piped.first_loss == pytest.approx(alone.first_loss, abs=1e-6)
    assert a.image_loss == pytest.approx(b.image_loss, abs=1e-6)
    assert a.text_loss == pytest.approx(b.text_loss, abs=1e-6)
    # and the same trained weights (ZeRO-3 over 2 ranks vs one process), saved by each mode
    w_piped, w_alone = (load_pretrained(tmp_path / d).state_dict() for d in ("piped", "alone"))
    base = load_pretrained(load(SMALL).policy.checkpoint).state_dict()
    assert w_piped.keys() == w_alone.keys()
    for k in w_alone:
        torch.testing.assert_close(w_piped[k], w_alone[k], atol=1e-6, rtol=0)
    assert any(not torch.equal(w_alone[k], base[k]) for k in base)      # the step changed the weights


def test_staleness_bound_holds(ray_cluster):
    pipe, result = run_pipeline(["trainer.steps=3", "trainer.max_staleness=1"])
    seen = pipe.counters.staleness_seen
    assert len(seen) == 3 * 2 and max(seen) <= 1
    assert all(r.staleness_max <= 1 for r in result.steps)


def test_learner_ranks_are_placed_all_or_nothing(ray_cluster):
    """A placement the cluster cannot satisfy (two ranks strictly on different nodes, one node here)
    fails within the timeout with an error naming the config, and leaves no reservation behind."""
    from dataclasses import replace

    from ray.util.placement_group import placement_group_table, remove_placement_group

    from driver.cluster import learner_placement
    from driver.config import ConfigError
    base = load(SMALL).pools.learner
    with pytest.raises(ConfigError, match=r"pools.learner: 2 ranks .*'STRICT_SPREAD'.*placement_timeout_s"):
        learner_placement(ray, replace(base, placement="STRICT_SPREAD", placement_timeout_s=3.0))
    assert all(g["state"] == "REMOVED" for g in placement_group_table().values())
    pg, options = learner_placement(ray, base)
    try:
        assert [o["scheduling_strategy"].placement_group_bundle_index for o in options] == [0, 1]
        table = placement_group_table(pg)
        assert table["state"] == "CREATED" and table["strategy"] == "PACK"
        assert list(table["bundles"].values()) == [{"CPU": base.num_cpus}] * 2
    finally:
        remove_placement_group(pg)


SRR_SMALL = ["tasks.rt2i=0.5", "tasks.srr=0.5", "trainer.groups_per_step=4", "data.group_size=2", "pools.refine.num=1",
             "srr.candidates=2", "srr.candidate_steps=3", "srr.think.max_new_tokens=6", "srr.flow.num_steps=4",
             "srr.flow.window_size=2", "srr.flow.window_start=[0,1]"]


def test_rt2i_and_srr_train_together_and_match_sync_mode(ray_cluster):
    """Both tasks through Ray: 2 RT2I groups from the rollout pool and 2 SRR episodes from the refine pool a
    step, split over 2 ZeRO-3 ranks the same way; every replica (rollout and refine) holds the learner's
    weights after each step; at max_staleness 0 the pipeline's first step equals sync mode's."""
    seen = []
    pipe, piped = run_pipeline(["trainer.steps=2", "trainer.max_staleness=0", *SRR_SMALL],
                               on_step=lambda p, rec: seen.append(p.checksums()))
    for learner, replicas in seen:
        assert replicas == [learner] * 3                 # 2 rollout actors, 1 refine actor
    a = piped.steps[0]
    assert a.tasks["rt2i"]["groups"] == 2 and a.tasks["srr"]["groups"] == 2
    assert 0 <= a.tasks["srr"]["improved"] <= 1 and a.tasks["srr"]["initial_reward"] <= a.tasks["srr"]["reward"] + 1
    alone = train_sync(load(SMALL + ["trainer.steps=1", "trainer.mode=sync", "trainer.max_staleness=0", *SRR_SMALL]))
    b = alone.steps[0]
    assert a.tasks == b.tasks and a.srr_skipped == b.srr_skipped
    assert a.reward_mean == pytest.approx(b.reward_mean, abs=1e-6)
    assert piped.first_loss == pytest.approx(alone.first_loss, abs=1e-6)
    assert a.text_loss == pytest.approx(b.text_loss, abs=1e-6)
