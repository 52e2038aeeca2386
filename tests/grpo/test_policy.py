"""The bring-up checklist through the real (tiny) model and the trainer's code path:
on-policy ratios are 1, and one optimizer step moves log-probs in the advantage's direction."""
from dataclasses import replace

import pytest
import torch

from grpo.policy import FlowConfig, LossConfig, ThinkConfig, grpo_loss, recompute, rollout, think_items
from umm.context import DrawPrompt, Text
from umm.guidance import CFGConfig

from tests.grpo.surrogate import flat_grads, policy_gradient_surrogate
from tests.umm.helpers import tiny_model

THINK = ThinkConfig(max_new_tokens=6, temperature=1.0, top_p=0.9)
FLOW = FlowConfig(num_steps=6, shift=3.0, window_size=3, window_start=(0, 1), noise_level=0.7,
                  cfg=CFGConfig(text_scale=3.0, interval=(0.4, 1.0)))
HW = (2, 2)


def _prompts(n):
    system = Text(ids=(20, 21))
    return [DrawPrompt(prefix=[system], text=Text(ids=tuple(range(30, 32 + i % 3)))) for i in range(n)]


def _rollout(model, prompts, seed=0, flow=FLOW):
    return rollout(model, prompts, hw=HW, think=THINK, flow=flow, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch,noise_block,temperature", [(1, 1, 1.0), (4, 1, 1.0), (4, 2, 1.0), (1, 1, 0.7),
                                                          (4, 1, 0.7)])
def test_on_policy_ratio_is_one_for_text_and_every_trained_step(batch, noise_block, temperature):
    model = tiny_model()
    prompts = _prompts(batch)
    think = replace(THINK, temperature=temperature)      # the learner must score at the sampling temperature
    ro = rollout(model, prompts, hw=HW, think=think, flow=replace(FLOW, noise_block=noise_block),
                 generator=torch.Generator().manual_seed(0))
    assert (ro.flow.basis is None) == (noise_block == 1)
    assert ro.flow.logp.shape == (FLOW.window_size, batch)
    assert ro.flow.latents.dtype == torch.float32 and ro.think.logp.dtype == torch.float32
    with torch.no_grad():
        r = recompute(model, prompts, ro, think=think, cfg=FLOW.cfg)
    text_logp, image_logp = r.text_logp, r.image_logp
    seq_ratio = torch.exp(((text_logp - ro.think.logp) * ro.think.mask).sum(1) / ro.think.mask.sum(1))
    assert (seq_ratio - 1).abs().max() < 1e-6
    assert (torch.exp(image_logp - ro.flow.logp) - 1).abs().max() < 1e-6


def test_shared_start_gives_a_group_one_x1_and_keeps_the_ratio_one():
    model = tiny_model()
    prompts = _prompts(1) * 4                       # a group: one prompt, G = 4
    shared = _rollout(model, prompts, flow=replace(FLOW, shared_start=True))
    x1 = shared.flow.latents[0]
    assert torch.equal(x1, x1[:1].expand_as(x1))
    # the SDE noise still differs, so the images do
    assert (shared.flow.latents[-1][1:] - shared.flow.latents[-1][0]).abs().amax(dim=(1, 2)).min() > 1e-3
    independent = _rollout(model, prompts)
    assert (independent.flow.latents[0][1:] - independent.flow.latents[0][0]).abs().amax(dim=(1, 2)).min() > 0.1
    with torch.no_grad():
        r = recompute(model, prompts, shared, think=THINK, cfg=FLOW.cfg)
    assert (torch.exp(r.image_logp - shared.flow.logp) - 1).abs().max() < 1e-6


def test_think_items_strip_the_closing_token():
    from umm.generation import TextSample
    eos = 2
    s = TextSample(tokens=torch.tensor([[7, 8, eos, 0], [eos, 0, 0, 0], [9, 9, 9, 9]]),
                   mask=torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool),
                   logp=torch.zeros(3, 4), finished=torch.tensor([True, True, False]))
    # a row that wrote only <|im_end|> has an empty plan segment; a row with no tokens at all has none
    assert think_items(s, eos=eos) == [Text(ids=(7, 8)), Text(ids=()), Text(ids=(9, 9, 9, 9))]
    none = TextSample(tokens=torch.zeros(2, 0, dtype=torch.long), mask=torch.zeros(2, 0, dtype=torch.bool),
                      logp=torch.zeros(2, 0), finished=torch.ones(2, dtype=torch.bool))
    assert think_items(none, eos=eos) == [None, None]


def _step(model, prompts, ro, adv, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    opt.zero_grad()
    res = grpo_loss(model, prompts, ro, adv, think=THINK, cfg=FLOW.cfg, loss=LossConfig(image_clip=1e-5))
    res.loss.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None))
    opt.step()
    return res, float(grad_norm)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_step_moves_text_and_image_logprobs_with_the_advantage(sign):
    model = tiny_model()
    model.vae.requires_grad_(False)
    prompts = _prompts(2)
    ro = _rollout(model, prompts, seed=3)
    adv = torch.tensor([sign, 0.0])             # only trajectory 0 carries a signal
    _step(model, prompts, ro, adv, lr=1e-3)
    with torch.no_grad():
        r = recompute(model, prompts, ro, think=THINK, cfg=FLOW.cfg)
    text_logp, image_logp = r.text_logp, r.image_logp
    d_text = ((text_logp - ro.think.logp) * ro.think.mask).sum(1)
    d_image = (image_logp - ro.flow.logp).mean(0)
    assert sign * d_text[0] > 0, d_text
    assert sign * d_image[0] > 0, d_image


@pytest.mark.parametrize("mode,with_think", [("rt2i", True), ("srr", True), ("rt2i", False)])
def test_loss_value_and_gradient_are_the_on_policy_policy_gradient(mode, with_think):
    """grpo_loss against the objective written from its definition (tests/grpo/surrogate.py): at ratio 1
    its value is -mean(A) and its gradient is that of the trajectory-weighted log-prob sum. Catches a
    dropped text term, a wrong text weight for the mode and a flipped sign on either term."""
    model = tiny_model()
    model.vae.requires_grad_(False)
    prompts = _prompts(3)
    think = THINK if with_think else None
    ro = rollout(model, prompts, hw=HW, think=think, flow=FLOW, generator=torch.Generator().manual_seed(5))
    adv = torch.tensor([1.0, -0.5, 0.25])
    params = [p for p in model.parameters() if p.requires_grad]
    res = grpo_loss(model, prompts, ro, adv, think=think, cfg=FLOW.cfg, loss=LossConfig(mode=mode))
    assert res.loss.item() == pytest.approx(-adv.mean().item(), abs=1e-6)
    got = torch.autograd.grad(res.loss, params, allow_unused=True)
    r = recompute(model, prompts, ro, think=think, cfg=FLOW.cfg)
    surrogate = policy_gradient_surrogate(image_logp=r.image_logp, text_logp=r.text_logp if with_think else None,
                                          text_mask=ro.think.mask, adv=adv, mode=mode)
    want = torch.autograd.grad(surrogate, params, allow_unused=True)
    g_got, g_want = flat_grads(got, params), flat_grads(want, params)
    assert g_want.norm() > 0
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6 * float(g_want.abs().max()))


def test_zero_advantage_gives_zero_gradient():
    model = tiny_model()
    model.vae.requires_grad_(False)
    prompts = _prompts(2)
    ro = _rollout(model, prompts)
    _, grad_norm = _step(model, prompts, ro, torch.zeros(2), lr=0.0)
    assert grad_norm == 0.0


def test_lora_training_reaches_both_experts():
    """With LoRA on, the combined loss sends gradient into adapters of the understanding expert
    (through the think text) and the generation expert (through the image steps)."""
    from umm.lora import LoRAConfig, apply_lora, lora_parameters
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4))
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    prompts = _prompts(2)
    ro = _rollout(model, prompts)
    res = grpo_loss(model, prompts, ro, torch.tensor([1.0, -1.0]), think=THINK, cfg=FLOW.cfg, loss=LossConfig())
    res.loss.backward()
    grads = {n: p.grad for n, p in lora_parameters(model).items()}
    und = [g for n, g in grads.items() if "_moe_gen" not in n and g is not None and g.abs().sum() > 0]
    gen = [g for n, g in grads.items() if "_moe_gen" in n and g is not None and g.abs().sum() > 0]
    assert und and gen
    assert res.image.ratio_max == pytest.approx(1.0, abs=1e-6) and res.text.ratio_max == pytest.approx(1.0, abs=1e-6)


def test_kl_to_the_base_weights_is_zero_at_init_and_pulls_back_after_drift():
    from umm.lora import LoRAConfig, apply_lora, lora_parameters
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4))
    prompts = _prompts(2)
    ro = _rollout(model, prompts)
    r = recompute(model, prompts, ro, think=THINK, cfg=FLOW.cfg, reference=True)
    assert r.image_kl.abs().max() < 1e-10                  # lora_B = 0: policy == reference
    torch.testing.assert_close(r.text_logp_ref, r.text_logp.detach())
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            if ".lora_B." in n:
                p.normal_(0, 0.1)                         # the policy drifts away from the base
    cfg = LossConfig(image_kl_weight=1.0, text_kl_weight=1.0)
    res = grpo_loss(model, prompts, ro, torch.zeros(2), think=THINK, cfg=FLOW.cfg, loss=cfg)
    assert res.image.kl > 0 and res.text.kl > 0
    from grpo.groups import GroupPayload, PolicySettings, groups_loss   # the trainer's step reports both KLs
    settings = PolicySettings(think=THINK, flow=FLOW, loss=cfg, canvas_size=4, edit_guidance=FLOW.cfg,
                              eval_think=None, eval_flow=FLOW)
    _, stats = groups_loss(model, [GroupPayload(index=0, draw_prompts=prompts, rollout=ro, think=THINK)],
                           [[0.0, 0.0]], settings)
    assert stats["image_kl"] == pytest.approx(res.image.kl, rel=1e-5)
    assert stats["text_kl"] == pytest.approx(res.text.kl, rel=1e-5)
    res.loss.backward()
    params = list(lora_parameters(model).values())
    with torch.no_grad():
        for p in params:
            p -= 0.5 * p.grad                               # with A = 0 only the KL acts: back to base
    r2 = recompute(model, prompts, ro, think=THINK, cfg=FLOW.cfg, reference=True)
    assert float(r2.image_kl.mean().detach()) < res.image.kl


def test_kl_reference_requires_lora():
    model = tiny_model()
    prompts = _prompts(1)
    ro = _rollout(model, prompts)
    with pytest.raises(ValueError, match=r"^a KL reference needs LoRA adapters \(the reference is the base weights\)$"):
        recompute(model, prompts, ro, think=THINK, cfg=FLOW.cfg, reference=True)


def test_bf16_base_with_fp32_lora_masters_trains_on_policy():
    """The method's precision: bf16 compute, fp32 adapter masters, fp32 trajectories, ratio 1."""
    from grpo.precision import keep_trainable_fp32
    from umm.lora import LoRAConfig, apply_lora, lora_parameters
    model = tiny_model().to(torch.bfloat16)
    apply_lora(model, LoRAConfig(rank=2, alpha=4))
    assert keep_trainable_fp32(model) == len(lora_parameters(model))
    prompts = _prompts(2)
    ro = _rollout(model, prompts)
    assert ro.flow.latents.dtype == torch.float32 and ro.flow.logp.dtype == torch.float32
    res = grpo_loss(model, prompts, ro, torch.tensor([1.0, -1.0]), think=THINK, cfg=FLOW.cfg, loss=LossConfig())
    res.loss.backward()
    assert res.image.ratio_max == pytest.approx(1.0, abs=1e-6)
    grads = [p.grad for p in lora_parameters(model).values()]
    assert all(g is not None and g.dtype == torch.float32 for g in grads)


def test_recompute_calls_the_model_alike_whatever_steps_were_trained():
    """The learner's model calls must not depend on the data (ZeRO-3 ranks gather weights module by module,
    in step): a window whose steps fall outside the CFG interval still evaluates the CFG branches when
    recomputed (same values: those rows take the conditional velocity), and an empty plan is a segment."""
    model = tiny_model()
    prompts = _prompts(2)
    calls = []
    velocity = model.velocity
    model.velocity = lambda *a, **k: calls.append(1) or velocity(*a, **k)
    counts = []
    for start in (0, 4):                        # 6 steps: t = 1 .. 1/6 -> the late window is outside (0.4, 1]
        flow = replace(FLOW, window_size=1, window_start=(start, start), shift=1.0)
        ro = _rollout(model, prompts, flow=flow)
        calls.clear()
        with torch.no_grad():
            r = recompute(model, prompts, ro, think=THINK, cfg=flow.cfg)
        counts.append(len(calls))
        assert (torch.exp(r.image_logp - ro.flow.logp) - 1).abs().max() < 1e-6
    assert counts[0] == counts[1] == 2          # the conditional and the text-CFG branch, both windows


def test_loss_config_bounds_and_messages_name_the_key():
    from umm.config import ConfigError
    ok = LossConfig()
    assert ok.validate() is ok
    replace(ok, text_clip_low=0.999, text_clip_high=1e-6).validate()
    for bad, message in [
        (replace(ok, image_clip=0.0), r"^loss\.image_clip: must be > 0, got 0\.0"),
        (replace(ok, text_clip_low=0.0), r"^loss\.text_clip_low / text_clip_high: need 0 < low < 1 and high > 0, "
                                         r"got 0\.0, "),
        (replace(ok, text_clip_low=1.0), r"^loss\.text_clip_low / text_clip_high"),
        (replace(ok, text_clip_low=1.5), r"^loss\.text_clip_low / text_clip_high"),
        (replace(ok, text_clip_high=0.0), r"^loss\.text_clip_low / text_clip_high"),
        (replace(ok, text_level="word"), r"^loss\.text_level='word': not one of"),
        (replace(ok, mode="x"), r"^loss\.mode='x': not one of"),
        (replace(ok, image_kl_weight=-1.0), r"^loss\.image_kl_weight / text_kl_weight: must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            bad.validate()
    with pytest.raises(ConfigError, match=r"^trainer\.loss\.image_clip"):
        replace(ok, image_clip=-1.0).validate("trainer.loss")


def test_grpo_loss_is_recompute_then_both_losses_with_every_setting_passed_on():
    """Off policy, every loss knob away from its default, LoRA for the KL reference: grpo_loss equals the
    recomputation and the two losses called by hand with those settings."""
    from grpo.losses import image_ppo_loss, text_grpo_loss, text_weight_for, trajectory_loss
    from umm.lora import LoRAConfig, apply_lora, lora_parameters
    torch.manual_seed(0)
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4))
    prompts = _prompts(3)
    think = replace(THINK, temperature=0.7)
    ro = rollout(model, prompts, hw=HW, think=think, flow=FLOW, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            p.add_(torch.randn_like(p) * 0.2)                # drift: off policy and away from the reference
    adv = torch.tensor([1.0, -0.5, 0.25])
    cfg = LossConfig(image_clip=1e-3, text_clip_low=0.01, text_clip_high=0.015, text_level="token", mode="srr",
                     image_kl_weight=0.3, image_kl_scale="exact", text_kl_weight=0.2)
    res = grpo_loss(model, prompts, ro, adv, think=think, cfg=FLOW.cfg, loss=cfg)
    r = recompute(model, prompts, ro, think=think, cfg=FLOW.cfg, reference=True, kl_scale="exact")
    step, img = image_ppo_loss(r.image_logp.T, ro.flow.logp.T, adv, clip_eps=1e-3, kl=r.image_kl.T, kl_weight=0.3)
    text, txt = text_grpo_loss(r.text_logp, ro.think.logp, ro.think.mask, adv, level="token", clip_low=0.01,
                               clip_high=0.015, logp_ref=r.text_logp_ref, kl_weight=0.2)
    total = trajectory_loss(image_step_loss=step, image_step_mask=torch.ones_like(step, dtype=torch.bool),
                            text_loss=text, text_weight=text_weight_for("srr", step.shape[1]))
    assert res.image == img and res.text == txt
    assert 0 < img.clipfrac < 1 and txt.clipfrac > 0 and img.kl > 0 and txt.kl > 0   # every knob is in play
    torch.testing.assert_close(res.loss, total)
    assert res.image_loss == pytest.approx(float(step.mean()), rel=1e-6)
    assert res.text_loss == pytest.approx(float(text.mean()), rel=1e-6) != 0.0
    flow_grpo = grpo_loss(model, prompts, ro, adv, think=think, cfg=FLOW.cfg, loss=replace(cfg, image_kl_scale="flow_grpo"))
    assert flow_grpo.image.kl != pytest.approx(img.kl, rel=1e-3)          # the scale reaches the KL
    no_plan = rollout(model, prompts, hw=HW, think=None, flow=FLOW, generator=torch.Generator().manual_seed(3))
    plain = grpo_loss(model, prompts, no_plan, adv, think=None, cfg=FLOW.cfg, loss=cfg)
    assert plain.text is None and plain.text_loss == 0.0


def test_recompute_without_a_think_config_scores_at_temperature_one_and_a_one_token_plan_is_text():
    torch.manual_seed(0)
    model = tiny_model()
    prompts = _prompts(2)
    ro = _rollout(model, prompts)                            # sampled at temperature 1.0
    r = recompute(model, prompts, ro, think=None, cfg=FLOW.cfg)
    torch.testing.assert_close(r.text_logp[ro.think.mask], ro.think.logp[ro.think.mask], rtol=1e-5, atol=1e-5)
    one = replace(THINK, max_new_tokens=1)
    ro1 = rollout(model, prompts, hw=HW, think=one, flow=FLOW, generator=torch.Generator().manual_seed(1))
    assert ro1.think.tokens.shape[1] == 1
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    r1 = recompute(model, prompts, ro1, think=one, cfg=FLOW.cfg)
    assert r1.text_logp.requires_grad                         # a one-token plan is text the loss trains
    assert not torch.allclose(r1.text_logp, ro1.think.logp)


def test_think_and_flow_config_bounds_and_messages_name_the_key():
    from umm.config import ConfigError
    ok_t, ok_f = ThinkConfig(), FlowConfig()
    for fine in (replace(ok_t, max_new_tokens=1), replace(ok_t, temperature=0.0), replace(ok_t, top_p=1.0),
                 replace(ok_t, top_p=0.001)):
        fine.validate()
    for bad, message in [(replace(ok_t, max_new_tokens=0), r"^think\.max_new_tokens: must be >= 1"),
                         (replace(ok_t, temperature=-0.1), r"^think\.temperature: must be >= 0"),
                         (replace(ok_t, top_p=0.0), r"^think\.top_p: must be in \(0, 1\]"),
                         (replace(ok_t, top_p=1.5), r"^think\.top_p")]:
        with pytest.raises(ConfigError, match=message):
            bad.validate()
    ode = replace(ok_f, num_steps=1, noise_level=0.0, window_size=5, window_start=(0, 9))
    assert ode.validate() is ode                    # the ODE has no SDE window to fit: any window settings
    replace(ok_f, noise_level=0.0, window_size=50).validate()
    for bad, message in [(replace(ok_f, num_steps=0), r"^flow\.num_steps: must be >= 1"),
                         (replace(ok_f, shift=0.0), r"^flow\.shift: must be > 0"),
                         (replace(ok_f, noise_level=-0.1), r"^flow\.noise_level: must be >= 0"),
                         (replace(ok_f, noise_block=0), r"^flow\.noise_block: must be >= 1"),
                         (replace(ok_f, sigma_at_one="x"), r"^flow\.sigma_at_one='x': not one of"),
                         (replace(ok_f, noise_level=0.5, window_size=50),
                          r"^flow\.window_size=50 / flow\.window_start=\[\d+, \d+\] / flow\.num_steps=\d+: "),
                         (replace(ok_f, cfg=replace(ok_f.cfg, text_scale=0.5)), r"^flow\.cfg\.text_scale")]:
        with pytest.raises(ConfigError, match=message):
            bad.validate()
    with pytest.raises(ConfigError, match=r"^policy\.think\.top_p"):
        replace(ok_t, top_p=0.0).validate("policy.think")


@pytest.mark.parametrize("uses_image", [False, True])
@pytest.mark.parametrize("which", ["mixed", "none", "all"])
def test_contexts_of_rows_with_and_without_a_plan_guide_each_row_by_the_definition(uses_image, which):
    from grpo.policy import draw_contexts, prompt_cache, velocity_fn
    from umm.context import GuidanceContexts, Image, encode_context
    torch.manual_seed(0)
    model = tiny_model()
    cfg = replace(FLOW.cfg, image_scale=2.0 if uses_image else 1.0, renorm_type="text_channel")
    prompts = _prompts(2)
    if uses_image:                       # edits: a source image before the instruction (image-CFG drops it)
        src = Image(pixels=torch.rand(3, 8, 8) * 2 - 1)
        prompts = [DrawPrompt(prefix=[src, *p.prefix], text=p.text) for p in prompts]
    plans = {"mixed": [Text(ids=(40, 41, 42)), None], "none": [None, None],
             "all": [Text(ids=(40, 41, 42)), Text(ids=(43,))]}[which]
    x = torch.randn(2, HW[0] * HW[1], _latent_dim(model))
    t = torch.full((2,), 0.8)
    with torch.no_grad():
        mixed = velocity_fn(model, draw_contexts(model, prompts, prompt_cache(model, prompts), plans, cfg=cfg),
                            hw=HW, cfg=cfg)(x, t, 0)
        for row in range(2):            # each row's contexts as their definition reads, encoded alone
            p, plan = prompts[row], [plans[row]] if plans[row] else []
            own = GuidanceContexts(full=encode_context(model, [[*p.prefix, p.text, *plan]]),
                                   no_text=encode_context(model, [p.no_text()]),
                                   no_image=encode_context(model, [[*p.no_image(), *plan]]) if uses_image else None)
            alone = velocity_fn(model, own, hw=HW, cfg=cfg)(x[row:row + 1], t[row:row + 1], 0)
            torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1])


def _latent_dim(model):
    ro = _rollout(model, _prompts(1))
    return ro.flow.latents.shape[-1]
