"""grpo.groups: the trainer's units of work (sample a group, refine, draw held-out images, the loss
over groups), through the shipped shapes policy and its world plugin."""
import random

import numpy as np
import pytest
import torch

from driver.config import load
from driver.stages import settings_from
from grpo.groups import (EvalRequest, GroupRequest, RefineRequest, batch_advantages, draw_heldout, groups_loss,
                         refine_group, sample_group)
from grpo.loading import load_policy, load_prompter
from shapes.plugin import ShapesJudge, ShapesWorld, record

SMALL = ["trainer.mode=sync", "policy.flow.num_steps=4", "policy.flow.window_size=2", "policy.flow.window_start=[0,1]",
         "policy.think.max_new_tokens=6", "data.group_size=3", "eval.num_steps=4"]


@pytest.fixture(scope="module")
def small():
    cfg = load(SMALL)
    model = load_policy(cfg.policy)
    return cfg, model, load_prompter(cfg.policy.checkpoint, model.cfg)


def _request(family="single_object", seed=0, index=0, group_size=3):
    prompt = ShapesWorld().train_source({"families": [family]}, seed=seed).next()
    return GroupRequest(index=index, prompt=prompt, group_size=group_size, seed=seed, policy_version=0)


def test_batch_advantages_match_an_independent_computation():
    rewards = [[0.1, 0.5, 0.9], [0.3, 0.3, 0.3], [1.0, 0.0, 0.5]]
    out = batch_advantages(rewards, std_scope="batch")
    flat = np.array(rewards).ravel()
    std = flat.std()
    for g, adv in zip(rewards, out.per_group):
        expect = (np.array(g) - np.mean(g)) / (std + 1e-4)
        if max(g) == min(g):
            expect = np.zeros(3)
        np.testing.assert_allclose(adv, np.clip(expect, -5, 5), rtol=1e-6, atol=1e-6)   # fp32 advantages
    assert out.zero_variance == [1]
    by_group = batch_advantages(rewards, std_scope="group")        # each group's own std
    for g, adv in zip(rewards, by_group.per_group):
        expect = np.zeros(3) if max(g) == min(g) else (np.array(g) - np.mean(g)) / (np.std(g) + 1e-4)
        np.testing.assert_allclose(adv, np.clip(expect, -5, 5), rtol=1e-6, atol=1e-6)
    # rewards are read in float64: a difference below fp32's resolution at 1.0 (1.2e-7) is still a signal
    fine = batch_advantages([[1.0, 1.0 + 1e-7]], std_scope="batch")
    assert fine.zero_variance == [] and fine.per_group[0][0] < 0 < fine.per_group[0][1]


def test_sample_group_is_deterministic_and_judged_by_the_world(small):
    cfg, model, prompter = small
    req = _request()
    s, judge = settings_from(cfg), ShapesJudge()
    meta1, pay1, img1 = sample_group(model, prompter, req, s, judge=judge)
    meta2, pay2, img2 = sample_group(model, prompter, req, s, judge=judge)
    assert img1.shape == (3, 32, 32, 3) and img1.dtype == np.uint8
    np.testing.assert_array_equal(img1, img2)
    assert torch.equal(pay1.rollout.flow.logp, pay2.rollout.flow.logp)
    assert torch.equal(pay1.rollout.think.tokens, pay2.rollout.think.tokens)
    assert meta1.plans == meta2.plans and len(meta1.plans) == 3
    # the plan is the decoded think tokens; the context starts with the checkpoint's think system prompt
    assert meta1.plans[0] == prompter.plan_text(pay1.rollout.think.tokens[0][pay1.rollout.think.mask[0]])
    assert pay1.draw_prompts[0].prefix == [prompter.turn("system", prompter.fmt.think_system)]
    other = GroupRequest(index=req.index, prompt=req.prompt, group_size=3, seed=req.seed + 1, policy_version=0)
    _, _, img3 = sample_group(model, prompter, other, s)
    assert not np.array_equal(img1, img3)
    # the strict verdicts travel with the group's metadata: those of exactly these images
    from shapes.judge import judge as shapes_judge
    assert meta1.judged == tuple(shapes_judge(img, req.prompt.meaning).correct for img in img1)
    # no judge (a prompt file's record): no verdicts, nothing else changes
    meta4, _, img4 = sample_group(model, prompter, req, s)
    assert meta4.judged is None and np.array_equal(img4, img1)


def test_groups_loss_is_on_policy_and_its_gradient_is_the_policy_gradient(small):
    """The trainer's loss over groups: at ratio 1 its value is -mean(A) per group, averaged over groups,
    and its gradient equals the policy gradient written from the method's definition
    (tests/grpo/surrogate.py) -- direction and size, not only that a gradient exists."""
    from grpo.policy import recompute
    from tests.grpo.surrogate import flat_grads, policy_gradient_surrogate

    cfg, model, prompter = small
    s = settings_from(cfg)
    pays = [sample_group(model, prompter, _request("colors", seed=1, index=i), s)[1] for i in range(2)]
    adv = [[1.0, -0.5, 0.25], [0.5, 0.25, -1.0]]
    loss, stats = groups_loss(model, pays, adv, s)
    want_value = sum(-sum(a) / len(a) for a in adv) / len(adv)
    assert stats["loss"] == pytest.approx(want_value, abs=1e-6) and stats["image_clip_frac"] == 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params, allow_unused=True)
    surrogate = 0.0
    for pay, a in zip(pays, adv):
        r = recompute(model, pay.draw_prompts, pay.rollout, think=s.think, cfg=s.flow.cfg)
        surrogate = surrogate + policy_gradient_surrogate(
            image_logp=r.image_logp, text_logp=r.text_logp, text_mask=pay.rollout.think.mask,
            adv=torch.tensor(a), mode="rt2i") / len(pays)
    want = torch.autograd.grad(surrogate, params, allow_unused=True)
    g_got, g_want = flat_grads(got, params), flat_grads(want, params)
    assert g_want.norm() > 0
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6 * float(g_want.abs().max()))
    with pytest.raises(ValueError, match="2 groups but 1"):
        groups_loss(model, pays, adv[:1], s)


def test_refine_group_edits_the_source_and_is_recomputable_on_policy(small):
    from grpo.policy import recompute
    from shapes.prompts import generate
    from shapes.scene import render

    cfg, model, prompter = small
    s = settings_from(cfg)
    prompt = generate("edit", random.Random(4), canvas_size=32)
    source = np.asarray(render(prompt.meaning.source), dtype=np.uint8)
    req = RefineRequest(index=0, prompt=record(prompt), source=source, instruction=prompt.text, group_size=3,
                        seed=11, policy_version=0)
    meta, pay, img = refine_group(model, prompter, req, s)
    assert img.shape == (3, 32, 32, 3) and img.dtype == np.uint8 and meta.plans == ("", "", "")
    np.testing.assert_array_equal(img, refine_group(model, prompter, req, s)[2])        # seeded
    assert pay.guidance == s.edit_guidance and pay.guidance.image_scale == cfg.policy.edit_cfg.image_scale
    # the edit is conditioned on the source: another source, same seed -> other images
    other = RefineRequest(**{**req.__dict__, "source": np.full_like(source, 255)})
    assert not np.array_equal(img, refine_group(model, prompter, other, s)[2])
    # the learner recomputes with the payload's own guidance: ratio 1; the run's text-only CFG would not be
    with torch.no_grad():
        same = recompute(model, pay.draw_prompts, pay.rollout, think=None, cfg=pay.guidance)
        text_only = recompute(model, pay.draw_prompts, pay.rollout, think=None, cfg=s.flow.cfg)
    torch.testing.assert_close(same.image_logp, pay.rollout.flow.logp, atol=1e-5, rtol=0)
    assert (text_only.image_logp - pay.rollout.flow.logp).abs().max() > 1e-3
    with pytest.raises(ValueError, match="refine request 0: source must be a uint8"):
        refine_group(model, prompter, RefineRequest(**{**req.__dict__, "source": source.astype(np.float32)}), s)


def test_draw_heldout_is_the_ode_path_and_seeded_per_batch(small):
    """Held-out drawing: the deterministic ODE at the evaluation temperature, fixed by the batch's seed,
    so before/after and any dealing of batches over actors are paired."""
    cfg, model, prompter = small
    s = settings_from(cfg)
    assert s.eval_flow.noise_level == 0 and s.eval_think.temperature == cfg.eval.think_temperature
    prompts = tuple(ShapesWorld().heldout_prompts({"families": ["colors"]})[:3])
    req = EvalRequest(index=0, prompts=prompts, seed=7, policy_version=0)
    mode = model.training
    meta, images = draw_heldout(model, prompter, req, s, judge=ShapesJudge())
    assert model.training == mode                                      # eval mode only while drawing
    assert images.shape == (3, 32, 32, 3) and len(meta.plans) == 3 and len(meta.judged) == 3
    again = draw_heldout(model, prompter, req, s)[1]
    np.testing.assert_array_equal(images, again)
    from shapes.judge import judge as shapes_judge
    assert meta.judged == tuple(shapes_judge(img, p.meaning).correct for img, p in zip(images, prompts))
