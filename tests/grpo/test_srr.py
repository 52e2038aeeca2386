"""grpo.srr: SRR's stage-1 candidates and stage-2 reflect-and-edit rollouts through the shipped shapes
policy, and the pick of the initial image (grpo.refine.pick_initial)."""
import re
from dataclasses import replace

import numpy as np
import pytest
import torch

from driver.config import load
from driver.stages import settings_from
from grpo.groups import groups_loss
from grpo.policy import recompute
from grpo.refine import pick_initial
from grpo.srr import (CandidatesRequest, ReflectRequest, SelfRefineConfig, SRRConfig, draw_candidates,
                      reflect_group)
from grpo.loading import load_policy, load_prompter
from shapes.plugin import ShapesJudge, ShapesWorld
from umm.config import ConfigError
from umm.context import Image

SMALL = ["trainer.mode=sync", "srr.candidates=3", "srr.candidate_steps=4", "srr.think.max_new_tokens=6",
         "srr.flow.num_steps=4", "srr.flow.window_size=2", "srr.flow.window_start=[0,1]", "eval.num_steps=4"]


@pytest.fixture(scope="module")
def small():
    cfg = load(SMALL)
    model = load_policy(cfg.policy)
    return cfg, model, load_prompter(cfg.policy.checkpoint, model.cfg)


def _prompt():
    return ShapesWorld().train_source({"families": ["colors"]}, seed=2).next()


def test_candidates_are_k_distinct_deterministic_ode_images(small):
    cfg, model, prompter = small
    req = CandidatesRequest(index=3, prompt=_prompt(), count=3, seed=5, policy_version=0)
    meta, images = draw_candidates(model, prompter, req, settings_from(cfg), cfg.srr, judge=ShapesJudge())
    assert images.shape == (3, 32, 32, 3) and meta.prompt_id == req.prompt.id and len(meta.judged) == 3
    assert len({img.tobytes() for img in images}) == 3                 # each row its own noise
    np.testing.assert_array_equal(images, draw_candidates(model, prompter, req, settings_from(cfg), cfg.srr)[1])


@pytest.mark.parametrize("group_size", [1, 4])
def test_reflect_group_is_an_edit_of_the_initial_image_and_on_policy(small, group_size):
    """The critique tokens and every trained edit step have ratio exactly 1 when the learner recomputes
    with the payload's own settings; the context holds the reflection prompt and the initial image."""
    cfg, model, prompter = small
    s = settings_from(cfg)
    prompt = _prompt()
    _, cands = draw_candidates(model, prompter, CandidatesRequest(index=0, prompt=prompt, count=2, seed=1,
                                                                  policy_version=0), s, cfg.srr)
    req = ReflectRequest(index=0, prompt=prompt, group_size=group_size, seed=9, policy_version=0)
    meta, pay, images = reflect_group(model, prompter, req, cands[1], s, cfg.srr)
    assert pay.task == "srr" and pay.think == cfg.srr.think and pay.guidance.uses_image
    assert images.shape == (group_size, 32, 32, 3) and len(meta.plans) == group_size
    dp = pay.draw_prompts[0]
    assert dp.prefix[0] == prompter.turn("system", prompter.fmt.reflect_system)
    assert isinstance(dp.prefix[1], Image)
    np.testing.assert_allclose(dp.prefix[1].pixels.permute(1, 2, 0).numpy(), cands[1] / 127.5 - 1.0, atol=1e-6)
    assert dp.text == prompter.turn("user", prompt.text)
    assert pay.rollout.think.tokens.shape[1] > 0 and pay.rollout.flow.logp.shape == (2, group_size)
    with torch.no_grad():
        r = recompute(model, pay.draw_prompts, pay.rollout, think=pay.think, cfg=pay.guidance)
    mask = pay.rollout.think.mask
    seq_ratio = torch.exp(((r.text_logp - pay.rollout.think.logp) * mask).sum(1) / mask.sum(1))
    assert (seq_ratio - 1).abs().max() < 1e-6
    assert (torch.exp(r.image_logp - pay.rollout.flow.logp) - 1).abs().max() < 1e-6
    # the learner's loss takes the payload's task: the critique counts like one image step (mode "srr")
    loss, stats = groups_loss(model, [pay], [[1.0] * group_size], s)
    assert stats["loss"] == pytest.approx(-1.0, abs=1e-6)
    # another initial image, same seed: other refinements (the edit is conditioned on it)
    other = reflect_group(model, prompter, req, cands[0], s, cfg.srr)[2]
    assert not np.array_equal(other, images)


def test_pick_initial_lowest_and_softmax():
    r = torch.tensor([0.6, 0.2, 0.9, 0.2])
    assert pick_initial(r) == 1                                          # the first of ties
    gen = torch.Generator().manual_seed(0)
    draws = [pick_initial(r, pick="softmax", temperature=0.1, generator=gen) for _ in range(4000)]
    p = torch.softmax(-r.double() / 0.1, 0)
    freq = torch.bincount(torch.tensor(draws), minlength=4).double() / len(draws)
    assert (freq - p).abs().max() < 0.03
    assert {pick_initial(r, pick="softmax", temperature=1e-4, generator=gen) for _ in range(50)} <= {1, 3}
    with pytest.raises(ValueError, match="pick must be one of"):
        pick_initial(r, pick="highest")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        pick_initial(r, pick="softmax", temperature=0.0)
    with pytest.raises(ValueError, match="stage1_rewards must be finite"):
        pick_initial(torch.tensor([0.1, float("nan")]))


def test_srr_config_checks_name_the_key():
    ok = SRRConfig()
    assert ok.validate() is ok and ok.flow.num_steps == 40 and ok.flow.window_size == 5
    for bad, key in [(replace(ok, candidates=0), "srr.candidates"), (replace(ok, pick="max"), "srr.pick"),
                     (replace(ok, flow=replace(ok.flow, cfg=replace(ok.flow.cfg, image_scale=1.0))),
                      "srr.flow.cfg.image_scale"),
                     (replace(ok, think=replace(ok.think, enabled=False)), "srr.think.enabled")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            bad.validate()


def test_srr_config_bounds_are_inclusive_where_the_method_allows_and_messages_name_nested_keys():
    ok = SRRConfig()
    replace(ok, candidates=1).validate()                      # one stage-1 image is a (degenerate) episode
    replace(ok, candidate_steps=1).validate()
    for bad, key in [(replace(ok, pick_temperature=0.0), "srr.pick_temperature: must be > 0"),
                     (replace(ok, candidate_steps=0), "srr.candidate_steps: must be >= 1"),
                     (replace(ok, think=replace(ok.think, max_new_tokens=0)), "srr.think.max_new_tokens"),
                     (replace(ok, flow=replace(ok.flow, num_steps=0)), "srr.flow.num_steps")]:
        with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.")):
            bad.validate()
    with pytest.raises(ConfigError, match=r"^refine\.srr\.candidates"):
        replace(ok, candidates=0).validate("refine.srr")


def test_self_refine_config_bounds():
    ok = SelfRefineConfig()
    assert ok.validate() is ok
    for fine in (replace(ok, threshold=0.0), replace(ok, threshold=1.0), replace(ok, rounds=0),
                 replace(ok, batch_size=1)):
        fine.validate()
    for bad, key in [(replace(ok, threshold=-0.01), "refine.threshold: must be in [0, 1]"),
                     (replace(ok, threshold=1.01), "refine.threshold"), (replace(ok, rounds=-1), "refine.rounds"),
                     (replace(ok, batch_size=0), "refine.batch_size")]:
        with pytest.raises(ConfigError, match="^" + key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")):
            bad.validate()


def test_pick_initial_shape_checks_and_its_generator():
    assert pick_initial(torch.tensor([0.3])) == 0                          # one candidate is enough
    assert pick_initial(torch.tensor([0.3]), pick="softmax") == 0
    for bad in (torch.tensor([]), torch.zeros(2, 2)):
        with pytest.raises(ValueError, match=rf"^stage1_rewards must have shape \(m,\) with m >= 1, got "
                                             rf"{re.escape(str(tuple(bad.shape)))}"):
            pick_initial(bad)
    r = torch.tensor([0.5, 0.45, 0.4, 0.55])
    draws = []
    for global_seed in (1, 2):                 # the pick follows its own generator, not torch's global RNG
        torch.manual_seed(global_seed)
        gen = torch.Generator().manual_seed(0)
        draws.append([pick_initial(r, pick="softmax", temperature=1.0, generator=gen) for _ in range(64)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 1


def test_pick_initial_default_temperature_is_the_srr_configs():
    r = torch.tensor([0.5, 0.45, 0.4, 0.55])
    draws = lambda **kw: [pick_initial(r, pick="softmax", generator=g, **kw)  # noqa: E731
                          for g in [torch.Generator().manual_seed(0)] for _ in range(200)]
    assert draws() == draws(temperature=SRRConfig().pick_temperature) != draws(temperature=1.0)
