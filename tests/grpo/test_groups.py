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
    # rewards are read in float64: a difference that fp32 rounds away at 1.0 (spacing 1.2e-7) is still a
    # signal when it is above the zero-variance tolerance (1e-8)
    fine = batch_advantages([[1.0, 1.0 + 2e-8]], std_scope="batch")
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


def test_batch_stats_merge_weighs_means_by_groups_and_skips_nan_extremes():
    from dataclasses import fields, replace

    from grpo.groups import BatchStats
    nan = float("nan")
    means = ("loss", "image_loss", "text_loss", "image_clip_frac", "text_clip_frac", "image_kl", "text_kl",
             "think_entropy")
    a = BatchStats(groups=1, **{k: 1.0 + i for i, k in enumerate(means)}, image_ratio_min=0.9, image_ratio_max=1.1,
                   text_ratio_min=nan, text_ratio_max=nan)
    b = BatchStats(groups=3, **{k: 10.0 * (i + 1) for i, k in enumerate(means)}, image_ratio_min=0.8,
                   image_ratio_max=1.05, text_ratio_min=0.7, text_ratio_max=1.3)
    m = BatchStats.merge([a, b])
    assert m.groups == 4
    for i, k in enumerate(means):
        assert getattr(m, k) == pytest.approx((1 * (1.0 + i) + 3 * 10.0 * (i + 1)) / 4, rel=1e-12), k
    c = replace(a, think_entropy=nan, groups=2)                # a group without a plan has no plan entropy
    assert BatchStats.merge([b, c]).think_entropy == b.think_entropy
    assert np.isnan(BatchStats.merge([c]).think_entropy)
    assert (m.image_ratio_min, m.image_ratio_max, m.text_ratio_min, m.text_ratio_max) == (0.8, 1.1, 0.7, 1.3)
    m2 = BatchStats.merge([b, a])                            # order-free, NaN first or last
    assert (m2.image_ratio_min, m2.image_ratio_max, m2.text_ratio_min, m2.text_ratio_max) == (0.8, 1.1, 0.7, 1.3)
    none = BatchStats.merge([a, a])                           # no group wrote text: NaN, not an error
    assert np.isnan(none.text_ratio_min) and np.isnan(none.text_ratio_max)
    assert {f.name for f in fields(BatchStats)} == {"groups", *means, "image_ratio_min", "image_ratio_max",
                                                     "text_ratio_min", "text_ratio_max"}


def test_groups_loss_stats_are_each_groups_own_loss_merged_off_policy_and_without_a_plan(small):
    """Off policy (weights moved after sampling), one group with a plan at a non-default think temperature
    and one without a plan: the loss and every stat equal those of grpo_loss run on each group with its own
    settings, merged by hand."""
    from dataclasses import replace

    from grpo.policy import grpo_loss
    cfg, model, prompter = small
    s = settings_from(cfg)
    # text clip bounds tighter than the drift of the plan's ratio, so the text clip fraction is not 0
    s = replace(s, loss=replace(s.loss, text_clip_low=1e-7, text_clip_high=1e-7))
    hot = replace(s, think=replace(s.think, temperature=0.7))
    plain = replace(s, think=None)
    pays = [sample_group(model, prompter, _request("colors", seed=2, index=0), hot)[1],
            sample_group(model, prompter, _request("colors", seed=3, index=1), plain)[1]]
    assert pays[0].think.temperature == 0.7 and pays[1].think is None
    adv = [[1.0, -0.5, 0.25], [0.5, 0.25, -1.0]]
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 3e-2)
        loss, stats = groups_loss(model, pays, adv, s)
        res = [grpo_loss(model, p.draw_prompts, p.rollout, torch.tensor(a), think=p.think, cfg=s.flow.cfg,
                         loss=replace(s.loss, mode="rt2i")) for p, a in zip(pays, adv)]
        cold = groups_loss(model, [replace(pays[0], think=replace(pays[0].think, temperature=1.0))], adv[:1], s)[1]
        srr_loss, _ = groups_loss(model, [replace(pays[0], task="srr")], adv[:1], s)     # the payload's own task
        srr_want = grpo_loss(model, pays[0].draw_prompts, pays[0].rollout, torch.tensor(adv[0]), think=pays[0].think,
                             cfg=s.flow.cfg, loss=replace(s.loss, mode="srr")).loss
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
    with_text, without = res
    assert float(srr_loss.detach()) == pytest.approx(float(srr_want.detach()), rel=1e-6)
    assert float(srr_want.detach()) != pytest.approx(float(with_text.loss.detach()), rel=1e-4)   # srr weighs text apart
    assert with_text.text is not None and without.text is None
    assert stats["groups"] == 2
    assert stats["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert float(loss.detach()) == pytest.approx((float(with_text.loss.detach()) + float(without.loss.detach())) / 2, rel=1e-5)
    assert stats["image_ratio_min"] == pytest.approx(min(r.image.ratio_min for r in res), rel=1e-6)
    assert stats["image_ratio_max"] == pytest.approx(max(r.image.ratio_max for r in res), rel=1e-6)
    assert stats["image_ratio_max"] != 1.0                 # the weights moved: off policy
    assert stats["text_ratio_min"] == pytest.approx(with_text.text.ratio_min, rel=1e-6)
    assert stats["text_ratio_max"] == pytest.approx(with_text.text.ratio_max, rel=1e-6)
    assert stats["text_clip_frac"] == pytest.approx(with_text.text.clipfrac / 2, abs=1e-9) and stats["text_clip_frac"] > 0
    # each group is recomputed at the temperature it was sampled with: scored at 1.0 its plan's ratio moves
    assert abs(cold["text_ratio_min"] - stats["text_ratio_min"]) > 1e-4
    assert stats["text_kl"] == pytest.approx(with_text.text.kl / 2, abs=1e-9)
    assert stats["image_clip_frac"] == pytest.approx((with_text.image.clipfrac + without.image.clipfrac) / 2)
    think = pays[0].rollout.think
    assert stats["think_entropy"] == pytest.approx(float(-think.logp[think.mask].mean()), rel=1e-6)   # plans only
    assert stats["think_entropy"] > 0


def test_policy_settings_evaluate_deterministically_with_the_eval_options(small):
    from grpo.groups import policy_settings
    cfg, _, _ = small
    s = policy_settings(cfg.policy, cfg.trainer.loss, eval_steps=7, eval_cfg_scale=2.5, eval_think_temperature=0.3,
                        eval_think=True)
    assert s.think == cfg.policy.think and s.flow == cfg.policy.flow and s.edit_guidance == cfg.policy.edit_cfg
    assert (s.eval_think.temperature, s.eval_think.top_p) == (0.3, 1.0)
    assert s.eval_flow.num_steps == 7 and s.eval_flow.noise_level == 0.0 and s.eval_flow.shared_start is False
    assert s.eval_flow.cfg.text_scale == 2.5 and s.eval_flow.cfg.image_scale == cfg.policy.flow.cfg.image_scale
    assert s.flow.num_steps == cfg.policy.flow.num_steps                 # training keeps its own sampler
    from dataclasses import replace
    sampled = replace(cfg.policy, think=replace(cfg.policy.think, top_p=0.9), flow=replace(cfg.policy.flow,
                                                                                           shared_start=True))
    s2 = policy_settings(sampled, cfg.trainer.loss, eval_steps=7, eval_cfg_scale=2.5, eval_think_temperature=0.3,
                         eval_think=True)
    assert s2.eval_think.top_p == 1.0 and s2.eval_flow.shared_start is False and s2.flow.shared_start is True
    assert policy_settings(sampled, cfg.trainer.loss, eval_steps=7, eval_cfg_scale=2.5, eval_think_temperature=0.3,
                           eval_think=False).eval_think is None
    off = replace(sampled, think=replace(sampled.think, enabled=False))
    s3 = policy_settings(off, cfg.trainer.loss, eval_steps=7, eval_cfg_scale=2.5, eval_think_temperature=0.3,
                         eval_think=True)
    assert s3.think is None and s3.eval_think is None


def test_images_are_the_final_latents_decoded_to_uint8_and_carry_the_policy_version(small):
    from grpo.groups import to_uint8
    cfg, model, prompter = small
    s = settings_from(cfg)
    req = GroupRequest(index=0, prompt=_request().prompt, group_size=2, seed=4, policy_version=7)
    _, pay, images = sample_group(model, prompter, req, s)
    assert pay.rollout.policy_version == 7
    with torch.no_grad():
        px = model.tokens_to_image(pay.rollout.flow.latents[-1].float(), pay.rollout.hw)
    want = np.clip(np.rint((px.numpy().transpose(0, 2, 3, 1) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images, want)
    ramp = torch.linspace(-1.5, 1.5, 7)                 # outside [-1, 1] clamps to 0 / 255
    tokens = torch.zeros(1, 1, 1)

    class Fixed:
        def tokens_to_image(self, latents, hw):
            return ramp.view(1, 1, 1, 7).expand(1, 3, 1, 7)
    got = to_uint8(Fixed(), tokens, (1, 7))
    assert got.shape == (1, 1, 7, 3) and got.dtype == np.uint8
    assert got[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]
