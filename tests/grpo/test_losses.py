"""grpo.losses: descent direction on toy policies, per-sample independence, clipping, shapes."""
import math

import pytest
import torch

from grpo.losses import image_ppo_loss, text_grpo_loss, text_weight_for, trajectory_loss
from grpo.sde import recompute_logp, sample_flow, timestep_schedule

ADV = torch.tensor([1.0, -1.0, 0.0])


# --------------------------------------------------------------------------- toy policies

def _token_logp(logits, tokens):
    """A tiny text policy: logits (B, T, V) table; log-prob (B, T) of the given tokens."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None])[..., 0]


def _text_setup():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen).requires_grad_()
    tokens = torch.randint(0, 7, (3, 5), generator=gen)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False
    return logits, tokens, mask


def _image_setup():
    """A tiny image policy: the velocity is a per-sample parameter u (B, D)."""
    u = torch.randn(3, 6, generator=torch.Generator().manual_seed(1)).requires_grad_()
    fn = lambda x, t, i: u.expand_as(x)  # noqa: E731
    traj = sample_flow(fn, torch.randn(3, 6, generator=torch.Generator().manual_seed(2)),
                       timesteps=timestep_schedule(6), sde_steps=[1, 2], noise_level=0.7,
                       generator=torch.Generator().manual_seed(3))
    return u, fn, traj


def _seq_logp(logits, tokens, mask):
    return torch.where(mask, _token_logp(logits, tokens), torch.zeros(())).sum(1)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_text_descent_follows_advantage_sign(level):
    logits, tokens, mask = _text_setup()
    logp = _token_logp(logits, tokens)
    before = _seq_logp(logits, tokens, mask).detach()
    loss, stats = text_grpo_loss(logp, logp.detach(), mask, ADV, level=level)
    assert loss.shape == (3,) and stats.ratio_mean == pytest.approx(1.0) and stats.clipfrac == 0.0
    loss.sum().backward()
    assert torch.equal(logits.grad[2], torch.zeros(5, 7))  # zero advantage, zero gradient
    with torch.no_grad():
        logits -= 0.1 * logits.grad
    after = _seq_logp(logits, tokens, mask).detach()
    assert after[0] > before[0] and after[1] < before[1] and after[2] == before[2]


def test_image_descent_follows_advantage_sign():
    u, fn, traj = _image_setup()
    logp = recompute_logp(fn, traj).T  # (B, K)
    assert (logp - traj.logp.T).abs().max() < 1e-6
    loss, stats = image_ppo_loss(logp, traj.logp.T, ADV)
    assert loss.shape == (3, 2) and stats.clipfrac == 0.0
    loss.sum().backward()
    assert torch.equal(u.grad[2], torch.zeros(6))
    with torch.no_grad():
        u -= 1e-3 * u.grad
    after = recompute_logp(fn, traj).T.sum(1).detach()
    before = traj.logp.T.sum(1)
    assert after[0] > before[0] and after[1] < before[1] and after[2] == before[2]


def test_image_loss_formula_mask_and_kl():
    logp_old = torch.zeros(2, 3)
    logp = torch.tensor([[0.0, 2e-5, -2e-5], [1e-6, 0.0, 3e-5]])
    adv = torch.tensor([2.0, -1.0])
    kl = torch.full((2, 3), 0.5)
    mask = torch.tensor([[True, True, True], [True, False, True]])
    loss, stats = image_ppo_loss(logp, logp_old, adv, clip_eps=1e-5, step_mask=mask, kl=kl, kl_weight=0.1)
    r = torch.exp(logp)
    want = torch.maximum(-adv[:, None] * r, -adv[:, None] * r.clamp(1 - 1e-5, 1 + 1e-5)) + 0.05
    assert torch.allclose(loss[mask], want[mask]) and loss[1, 1] == 0.0
    assert stats.clipfrac == pytest.approx(3 / 5) and stats.kl == pytest.approx(0.5)
    assert stats.ratio_max == pytest.approx(float(r[mask].max()))


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_masked_steps_with_garbage_logp_give_a_finite_loss_and_gradient(bad):
    """A masked step's log-prob (and KL) may be anything; it must reach neither the loss nor the gradient."""
    logp = torch.tensor([[1e-6, bad], [bad, -2e-6]], requires_grad=True)
    logp_old = torch.tensor([[0.0, bad], [0.0, 0.0]])
    kl = torch.tensor([[0.3, bad], [bad, 0.1]])
    mask = torch.tensor([[True, False], [False, True]])
    loss, stats = image_ppo_loss(logp, logp_old, torch.tensor([1.0, -1.0]), step_mask=mask, kl=kl, kl_weight=0.5)
    assert torch.isfinite(loss).all() and loss[0, 1] == 0.0 and loss[1, 0] == 0.0
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all()
    assert logp.grad[0, 1] == 0.0 and logp.grad[1, 0] == 0.0
    # the valid entries are what the formula gives, untouched by the garbage beside them
    assert loss[0, 0].item() == pytest.approx(-math.exp(1e-6) + 0.5 * 0.3, rel=1e-6)
    assert loss[1, 1].item() == pytest.approx(math.exp(-2e-6) + 0.5 * 0.1, rel=1e-6)
    assert stats.ratio_max == pytest.approx(float(torch.exp(logp.detach()[0, 0])))


@pytest.mark.parametrize("adv_sign,ratio_side,grad_zero", [
    (1.0, "high", True), (1.0, "low", False), (-1.0, "low", True), (-1.0, "high", False)])
def test_image_clip_zeroes_gradient_on_the_clipped_side(adv_sign, ratio_side, grad_zero):
    shift = 5e-5 if ratio_side == "high" else -5e-5
    logp = torch.full((1, 1), shift, requires_grad=True)
    loss, stats = image_ppo_loss(logp, torch.zeros(1, 1), torch.tensor([adv_sign]), clip_eps=1e-5)
    loss.sum().backward()
    assert stats.clipfrac == 1.0
    assert (logp.grad.abs().item() == 0.0) == grad_zero


def test_text_sequence_and_token_formulas_and_clip():
    logp_old = torch.zeros(2, 3)
    logp = torch.tensor([[0.5, 0.1, 99.0], [-0.4, 0.3, -0.2]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    adv = torch.tensor([1.0, -2.0])
    seq, stats = text_grpo_loss(logp, logp_old, mask, adv, level="sequence")
    r = torch.exp(torch.tensor([0.3, -0.1]))  # masked means of the log-ratios
    want = torch.maximum(-adv * r, -adv * r.clamp(0.8, 1.28))
    assert torch.allclose(seq, want) and stats.clipfrac == 0.5  # exp(0.3) = 1.35 > 1.28
    tok, _ = text_grpo_loss(logp, logp_old, mask, adv, level="token")
    rt = torch.exp(logp)
    per_tok = torch.maximum(-adv[:, None] * rt, -adv[:, None] * rt.clamp(0.8, 1.28))
    assert torch.allclose(tok, torch.stack([per_tok[0, :2].mean(), per_tok[1].mean()]))


def test_text_k3_kl_and_empty_sample():
    gen = torch.Generator().manual_seed(4)
    logp = (-torch.rand(2, 4, generator=gen)).requires_grad_()
    ref = -torch.rand(2, 4, generator=gen)
    mask = torch.tensor([[True, True, True, False], [False] * 4])
    logp_pad = torch.where(mask, logp, torch.tensor(float("-inf")))  # garbage at padding
    loss, stats = text_grpo_loss(logp_pad, logp.detach(), mask, torch.zeros(2), logp_ref=ref, kl_weight=0.5)
    d = (ref - logp.detach())[0, :3]
    k3 = (torch.exp(d) - d - 1).mean()
    assert torch.allclose(loss, torch.stack([0.5 * k3, torch.tensor(0.0)]))
    assert stats.kl == pytest.approx(float(k3))
    loss.sum().backward()
    assert torch.isfinite(logp.grad).all() and torch.equal(logp.grad[1], torch.zeros(4))
    same, _ = text_grpo_loss(ref, ref, mask, torch.zeros(2), logp_ref=ref, kl_weight=1.0)
    assert torch.equal(same, torch.zeros(2))


def test_permuting_the_batch_permutes_per_sample_losses():
    gen = torch.Generator().manual_seed(5)
    perm = torch.tensor([2, 0, 3, 1])
    logp, logp_old, adv = torch.randn(4, 3, generator=gen) * 1e-5, torch.zeros(4, 3), torch.randn(4, generator=gen)
    img, _ = image_ppo_loss(logp, logp_old, adv)
    img_p, _ = image_ppo_loss(logp[perm], logp_old[perm], adv[perm])
    assert torch.equal(img_p, img[perm])
    mask = torch.rand(4, 3, generator=gen) > 0.3
    for level in ("sequence", "token"):
        txt, _ = text_grpo_loss(logp * 1e4, logp_old, mask, adv, level=level)
        txt_p, _ = text_grpo_loss(logp[perm] * 1e4, logp_old[perm], mask[perm], adv[perm], level=level)
        assert torch.equal(txt_p, txt[perm])


def test_column_advantage_is_rejected():
    with pytest.raises(ValueError, match="adv"):
        image_ppo_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="adv"):
        text_grpo_loss(torch.zeros(4, 3), torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, 1))


@pytest.mark.parametrize("kwargs,name", [
    ({"logp_old": torch.zeros(2, 4)}, "logp_old"),
    ({"step_mask": torch.ones(2, dtype=torch.bool)}, "step_mask"),
    ({"kl": torch.zeros(3, 3)}, "kl"),
    ({"clip_eps": 0.0}, "clip_eps")])
def test_image_loss_bad_inputs(kwargs, name):
    args = {"logp": torch.zeros(2, 3), "logp_old": torch.zeros(2, 3), "adv": torch.zeros(2)} | kwargs
    with pytest.raises(ValueError, match=name):
        image_ppo_loss(args.pop("logp"), args.pop("logp_old"), args.pop("adv"), **args)


@pytest.mark.parametrize("kwargs,name", [
    ({"mask": torch.ones(2, 4, dtype=torch.bool)}, "mask"),
    ({"level": "chunk"}, "level"),
    ({"clip_low": 1.5}, "clip_low"),
    ({"logp_ref": torch.zeros(2)}, "logp_ref")])
def test_text_loss_bad_inputs(kwargs, name):
    args = {"mask": torch.ones(2, 3, dtype=torch.bool)} | kwargs
    with pytest.raises(ValueError, match=name):
        text_grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), args.pop("mask"), torch.zeros(2), **args)


def test_trajectory_loss_weighting():
    step_loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 6.0]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    text = torch.tensor([10.0, 20.0])
    rt2i = trajectory_loss(image_step_loss=step_loss, image_step_mask=mask, text_loss=text,
                           text_weight=torch.tensor([text_weight_for("rt2i", 3), text_weight_for("rt2i", 2)]))
    assert rt2i.item() == pytest.approx(((6 + 30) / 6 + (10 + 40) / 4) / 2)
    srr = trajectory_loss(image_step_loss=step_loss, image_step_mask=mask, text_loss=text,
                          text_weight=text_weight_for("srr", 3))
    assert srr.item() == pytest.approx(((6 + 10) / 4 + (10 + 20) / 3) / 2)
    image_only = trajectory_loss(image_step_loss=step_loss, image_step_mask=mask, text_loss=None, text_weight=1.0)
    assert image_only.item() == pytest.approx((6 / 3 + 10 / 2) / 2)
    empty = trajectory_loss(image_step_loss=step_loss, image_step_mask=torch.zeros(2, 3, dtype=torch.bool),
                            text_loss=text, text_weight=0.0)
    assert empty.item() == 0.0


def test_trajectory_loss_and_text_weight_bad_inputs():
    ok = {"image_step_loss": torch.zeros(2, 3), "image_step_mask": torch.ones(2, 3, dtype=torch.bool),
          "text_loss": torch.zeros(2), "text_weight": 1.0}
    for key, bad in [("image_step_mask", torch.ones(2, 2)), ("text_loss", torch.zeros(2, 1)),
                     ("text_weight", torch.ones(3)), ("text_weight", -1.0)]:
        with pytest.raises(ValueError, match=key):
            trajectory_loss(**(ok | {key: bad}))
    with pytest.raises(ValueError, match="mode"):
        text_weight_for("t2i", 3)
    with pytest.raises(ValueError, match="n_trained_steps"):
        text_weight_for("rt2i", -1)
    assert text_weight_for("rt2i", 10) == 10.0 and text_weight_for("srr", 5) == 1.0
