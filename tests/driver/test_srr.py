"""SRR on the driver's side: the initial image is the lowest-reward candidate, rectification on recorded
rewards, the skip rule (a sub-batch with no improvement trains nothing and is counted), task mixing."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from driver.config import ConfigError, load
from driver.lanes import Counters, Ready, SRRLane
from driver.srr import Episode, TaskMix, choose_initial, rectify
from driver.sync import done
from grpo.srr import SRRConfig
from reward_service.scoring import ScoreResult
from worlds.records import PromptRecord

PROMPT = PromptRecord(id="p", text="a red circle")


def _episode(i=0, stage1=(0.5, 0.2, 0.7)):
    ep = Episode(index=i, prompt=PROMPT, seed=10 + i, stage1_version=0)
    choose_initial(ep, list(stage1), SRRConfig())
    return ep


def test_initial_is_the_lowest_stage1_image_and_rectification_by_hand():
    ep = _episode()
    assert ep.initial == 1 and ep.initial_reward == 0.2 and ep.stage1_rewards == [0.5, 0.2, 0.7]
    r = rectify(ep, [0.1, 0.2, 0.35, 0.9])
    # strictly better than 0.2 keeps its reward; the rest get min(stage 1) = 0.2
    assert r.rewards == [0.2, 0.2, 0.35, 0.9] and r.improved == 2 and r.rectified == 2
    soft = Episode(index=0, prompt=PROMPT, seed=3, stage1_version=0)
    picks = {choose_initial(Episode(index=0, prompt=PROMPT, seed=s, stage1_version=0), [0.5, 0.2, 0.7],
                            SRRConfig(pick="softmax", pick_temperature=10.0)) for s in range(40)}
    assert picks == {0, 1, 2}                                         # hot softmax: any candidate
    assert choose_initial(soft, [0.5, 0.2, 0.7], SRRConfig(pick="softmax", pick_temperature=10.0)) == \
        choose_initial(soft, [0.5, 0.2, 0.7], SRRConfig(pick="softmax", pick_temperature=10.0))   # seeded


def test_task_mix_and_its_config_checks():
    assert TaskMix.of({"rt2i": 1.0, "srr": 0.0}, 4) == TaskMix(rt2i=4, srr=0)
    assert TaskMix.of({"rt2i": 0.5, "srr": 0.5}, 4) == TaskMix(rt2i=2, srr=2)
    assert TaskMix.of({"rt2i": 0.0, "srr": 1.0}, 4) == TaskMix(rt2i=0, srr=4)
    with pytest.raises(ConfigError, match="tasks: rt2i=0.0, srr=0.0"):
        load(["tasks.rt2i=0"])
    with pytest.raises(ConfigError, match="tasks.srr=0.1: rounds to no SRR group"):
        load(["tasks.srr=0.1"])
    with pytest.raises(ConfigError, match=r"pools.refine.num >= 1"):
        load(["tasks.srr=0.5", "pools.refine.num=0"])
    with pytest.raises(ConfigError, match=r"srr.flow.window_size"):
        load(["tasks.srr=0.5", "pools.refine.num=1", "srr.flow.window_start=[0,9]"])


def _ready(ep, refined):
    scores = [ScoreResult(key=f"k{j}", reward=r, audit=None, verifier="t") for j, r in enumerate(refined)]
    return Ready(task="srr", index=ep.index, prompt=PROMPT, policy_version=0, meta=None, payload=None,
                 scores=done(scores), episode=ep)


def test_skip_rule_drops_a_sub_batch_with_no_improvement_and_counts_it():
    counters = Counters()
    with ThreadPoolExecutor(1) as pool:
        lane = SRRLane(slots=[], quota=2, max_staleness=0, group_size=2, scorer=None, scoring=pool,
                       counters=counters, stream=None, base_seed=0, srr=SRRConfig())
    eps = [_episode(i) for i in range(4)]                # initial rewards 0.2 each
    for ep, refined in zip(eps, [[0.2, 0.1], [0.15, 0.2], [0.1, 0.1], [0.3, 0.0]]):
        lane.order.append(ep.index)
        lane.done[ep.index] = _ready(ep, refined)
    assert lane.peek(version=0) is None                  # groups 0, 1: nothing beat 0.2 -> skipped
    assert counters.total["srr_skipped"] == 1 and list(lane.order) == [2, 3]
    picked = lane.peek(version=0)                        # groups 2, 3: group 3 improved -> trains
    assert picked == [2, 3] and counters.total["srr_skipped"] == 1
    batch = lane.pop(picked)
    # what they train on: rectified, a refinement no better than 0.2 gets min(stage 1) = 0.2
    assert [g.rewards() for g in batch] == [[0.2, 0.2], [0.3, 0.2]] and not lane.order
