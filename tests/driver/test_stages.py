"""The trainer's stage functions, shared by sync mode and the Ray pipeline."""
import numpy as np
import pytest
import torch

from driver.config import load
from driver.stages import (GroupRequest, PromptStream, RefineRequest, batch_advantages, groups_loss, judge_group,
                           load_policy, refine_group, sample_group, settings_from)
from shapes.benchmark import is_held_out
from shapes.tokenizer import build_tokenizer

SMALL = ["trainer.mode=sync", "policy.flow.num_steps=4", "policy.flow.window_size=2", "policy.flow.window_start=[0,1]",
         "policy.think.max_new_tokens=6", "data.group_size=3"]


@pytest.fixture(scope="module")
def small():
    cfg = load(SMALL)
    return cfg, load_policy(cfg.policy), build_tokenizer()


def test_prompt_stream_is_seeded_and_never_held_out():
    a = PromptStream(["single_object", "counting", "implicit_color"], seed=3, canvas_size=32)
    b = PromptStream(["single_object", "counting", "implicit_color"], seed=3, canvas_size=32)
    ra = [a.next_request(group_size=2, base_seed=3, policy_version=0) for _ in range(200)]
    rb = [b.next_request(group_size=2, base_seed=3, policy_version=0) for _ in range(200)]
    assert [r.prompt.text for r in ra] == [r.prompt.text for r in rb]
    assert [r.index for r in ra] == list(range(200))
    assert len({r.seed for r in ra}) == 200
    assert not any(is_held_out(r.prompt.text, family=r.prompt.family) for r in ra)
    assert {r.prompt.family for r in ra} == {"single_object", "counting", "implicit_color"}


def test_batch_advantages_match_an_independent_computation():
    rewards = [[0.1, 0.5, 0.9], [0.3, 0.3, 0.3], [1.0, 0.0, 0.5]]
    out = batch_advantages(rewards, std_scope="batch")
    flat = np.array(rewards).ravel()
    std = flat.std()
    for g, adv in zip(rewards, out.per_group):
        expect = (np.array(g) - np.mean(g)) / (std + 1e-4)
        if max(g) == min(g):
            expect = np.zeros(3)
        np.testing.assert_allclose(adv, np.clip(expect, -5, 5), rtol=1e-6, atol=1e-6)
    assert out.zero_variance == [1]


def test_sample_group_is_deterministic_and_judgeable(small):
    cfg, model, tok = small
    stream = PromptStream(["single_object"], seed=0, canvas_size=32)
    req = stream.next_request(group_size=3, base_seed=0, policy_version=0)
    s = settings_from(cfg)
    meta1, pay1, img1 = sample_group(model, tok, req, s)
    meta2, pay2, img2 = sample_group(model, tok, req, s)
    assert img1.shape == (3, 32, 32, 3) and img1.dtype == np.uint8
    np.testing.assert_array_equal(img1, img2)
    assert torch.equal(pay1.rollout.flow.logp, pay2.rollout.flow.logp)
    assert torch.equal(pay1.rollout.think.tokens, pay2.rollout.think.tokens)
    assert meta1.plans == meta2.plans and len(meta1.plans) == 3
    other = GroupRequest(index=req.index, prompt=req.prompt, group_size=3, seed=req.seed + 1, policy_version=0)
    _, _, img3 = sample_group(model, tok, other, s)
    assert not np.array_equal(img1, img3)
    # the strict verdicts travel with the group's metadata: those of exactly these images
    from shapes.judge import judge
    assert meta1.judged == tuple(judge(img, req.prompt.meaning).correct for img in img1)
    assert list(meta1.judged) == judge_group(img1, req.prompt)


def test_groups_loss_is_on_policy_and_its_gradient_is_the_policy_gradient(small):
    """The trainer's loss over groups: at ratio 1 its value is -mean(A) per group, averaged over groups,
    and its gradient equals the policy gradient written from the method's definition
    (tests/grpo/surrogate.py) -- direction and size, not only that a gradient exists."""
    from grpo.policy import recompute
    from tests.grpo.surrogate import flat_grads, policy_gradient_surrogate

    cfg, model, tok = small
    s = settings_from(cfg)
    stream = PromptStream(["colors"], seed=1, canvas_size=32)
    pays = [sample_group(model, tok, stream.next_request(group_size=3, base_seed=1, policy_version=0), s)[1]
            for _ in range(2)]
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

    cfg, model, tok = small
    s = settings_from(cfg)
    prompt = generate("edit", __import__("random").Random(4), canvas_size=32)
    source = np.asarray(render(prompt.meaning.source), dtype=np.uint8)
    req = RefineRequest(index=0, prompt=prompt, source=source, instruction=prompt.text, group_size=3, seed=11,
                        policy_version=0)
    meta, pay, img = refine_group(model, tok, req, s)
    assert img.shape == (3, 32, 32, 3) and img.dtype == np.uint8 and meta.plans == ("", "", "")
    np.testing.assert_array_equal(img, refine_group(model, tok, req, s)[2])        # seeded
    assert pay.guidance == s.edit_guidance and pay.guidance.image_scale == cfg.policy.flow.cfg_image_scale
    # the edit is conditioned on the source: another source, same seed -> other images
    other = RefineRequest(**{**req.__dict__, "source": np.full_like(source, 255)})
    assert not np.array_equal(img, refine_group(model, tok, other, s)[2])
    # the learner recomputes with the payload's own guidance: ratio 1; the run's text-only CFG would not be
    with torch.no_grad():
        same = recompute(model, pay.draw_prompts, pay.rollout, think=None, cfg=pay.guidance)
        text_only = recompute(model, pay.draw_prompts, pay.rollout, think=None, cfg=s.flow.cfg)
    torch.testing.assert_close(same.image_logp, pay.rollout.flow.logp, atol=1e-5, rtol=0)
    assert (text_only.image_logp - pay.rollout.flow.logp).abs().max() > 1e-3
    with pytest.raises(ValueError, match="refine request 0: source must be a uint8"):
        refine_group(model, tok, RefineRequest(**{**req.__dict__, "source": source.astype(np.float32)}), s)
