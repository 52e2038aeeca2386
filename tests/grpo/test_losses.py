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


def test_image_loss_defaults_clip_1e5_and_no_kl():
    """Defaults: clip_eps = 1e-5 (the log-probs are means over latent elements) and kl_weight = 0, so a
    KL handed in is reported but adds nothing to the loss."""
    logp = torch.tensor([[2e-5, 5e-6, -2e-5]])
    loss, stats = image_ppo_loss(logp, torch.zeros(1, 3), torch.tensor([1.0]), kl=torch.full((1, 3), 0.25))
    # A = 1: -min(r, clip(r)); clipped above 1 + 1e-5 only
    want = [-(1 + 1e-5), -math.exp(5e-6), -math.exp(-2e-5)]
    assert loss[0].tolist() == pytest.approx(want, rel=1e-6, abs=0)  # 1 + 1e-5 vs 1 + 2e-5: 1e-5 apart
    assert stats.clipfrac == pytest.approx(2 / 3) and stats.kl == 0.25


@pytest.mark.parametrize("kl_weight", [0.0, 0.1, 1.0])
def test_image_loss_adds_the_weighted_kl(kl_weight):
    logp = torch.tensor([[1e-6, -3e-6], [0.0, 2e-6]])
    kl = torch.tensor([[0.2, 0.6], [0.0, 1.0]])
    adv = torch.tensor([-1.0, 0.5])
    r = torch.exp(logp)  # inside the clip range: loss = -A r
    loss, stats = image_ppo_loss(logp, torch.zeros(2, 2), adv, kl=kl, kl_weight=kl_weight)
    torch.testing.assert_close(loss, -adv[:, None] * r + kl_weight * kl)
    assert stats.kl == pytest.approx(0.45)
    # a weight without a KL adds nothing; the stats' kl is 0 when none was computed
    no_kl, stats = image_ppo_loss(logp, torch.zeros(2, 2), adv, kl_weight=kl_weight)
    torch.testing.assert_close(no_kl, -adv[:, None] * r)
    assert stats.kl == 0.0


def test_stats_cover_the_valid_entries_only():
    logp = torch.tensor([[0.1, -0.2, 5.0], [0.05, 9.0, -9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    kl = torch.tensor([[0.1, 0.3, 99.0], [0.2, 99.0, 99.0]])
    _, stats = image_ppo_loss(logp, torch.zeros(2, 3), torch.ones(2), clip_eps=0.15, step_mask=mask, kl=kl)
    r = [math.exp(0.1), math.exp(-0.2), math.exp(0.05)]  # exp(-0.2) = 0.82 < 0.85: the one clipped
    assert stats.ratio_mean == pytest.approx(sum(r) / 3) and stats.ratio_max == pytest.approx(r[0])
    assert stats.ratio_min == pytest.approx(r[1]) and stats.clipfrac == pytest.approx(1 / 3)
    assert stats.kl == pytest.approx(0.2)
    _, tok = text_grpo_loss(logp, torch.zeros(2, 3), mask, torch.ones(2), level="token", clip_low=0.15)
    assert (tok.ratio_mean, tok.ratio_max, tok.ratio_min) == pytest.approx((sum(r) / 3, r[0], r[1]))
    assert tok.clipfrac == pytest.approx(1 / 3) and tok.kl == 0.0


def test_stats_with_no_valid_entry_are_nan_ratios_and_zero_fractions():
    none = torch.zeros(2, 3, dtype=torch.bool)
    _, img = image_ppo_loss(torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2), step_mask=none,
                            kl=torch.ones(2, 3), kl_weight=1.0)
    _, txt = text_grpo_loss(torch.ones(2, 3), torch.zeros(2, 3), none, torch.ones(2), logp_ref=torch.zeros(2, 3))
    for stats in (img, txt):
        assert all(math.isnan(x) for x in (stats.ratio_mean, stats.ratio_max, stats.ratio_min))
        assert stats.clipfrac == 0.0 and stats.kl == 0.0


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


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_a_ratio_on_the_clip_edge_is_not_clipped(level):
    """The clip range [1 - clip_low, 1 + clip_high] is closed: clipfrac counts ratios strictly outside.
    exp(+-ln 2) is 2 and 1/2 exactly in fp32, the edges for clip_low = 1/2, clip_high = 1."""
    log_ratio = torch.tensor([[math.log(2)], [-math.log(2)]])
    assert torch.exp(log_ratio).flatten().tolist() == [2.0, 0.5]
    args = (log_ratio, torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool), torch.tensor([1.0, -1.0]))
    loss, stats = text_grpo_loss(*args, level=level, clip_low=0.5, clip_high=1.0)
    assert stats.clipfrac == 0.0 and loss.tolist() == [-2.0, 0.5]
    _, stats = text_grpo_loss(*args, level=level, clip_low=0.499, clip_high=0.999)
    assert stats.clipfrac == 1.0


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_text_sample_with_one_valid_token(level):
    """The masked mean over one token is that token (ratio and KL alike)."""
    logp = torch.tensor([[0.1, 7.0, 7.0], [0.1, 0.1, 0.0]])
    mask = torch.tensor([[True, False, False], [True, True, False]])
    ref = torch.tensor([[-0.3, 0.0, 0.0], [-0.3, -0.3, 0.0]])
    loss, stats = text_grpo_loss(logp, torch.zeros(2, 3), mask, torch.ones(2), level=level, logp_ref=ref,
                                 kl_weight=1.0)
    k3 = math.exp(-0.4) + 0.4 - 1
    assert loss.tolist() == pytest.approx([-math.exp(0.1) + k3] * 2)
    assert stats.ratio_mean == pytest.approx(math.exp(0.1)) and stats.kl == pytest.approx(k3)


def test_text_kl_is_reported_but_weighted_zero_by_default():
    logp = torch.tensor([[0.1, -0.1], [0.2, 0.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    ref = torch.tensor([[0.5, 0.0], [0.0, 0.0]])
    plain, _ = text_grpo_loss(logp, torch.zeros(2, 2), mask, torch.tensor([1.0, -1.0]))
    with_ref, stats = text_grpo_loss(logp, torch.zeros(2, 2), mask, torch.tensor([1.0, -1.0]), logp_ref=ref)
    assert torch.equal(with_ref, plain)
    d = ref - logp
    assert stats.kl == pytest.approx(float((torch.exp(d) - d - 1).mean()))


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
    ({"logp": torch.zeros(6)}, r"logp must have shape \(B, K\), got \(6,\)"),
    ({"logp_old": torch.zeros(2, 4)}, "logp_old must"),
    ({"adv": torch.zeros(3)}, "adv must"),
    ({"step_mask": torch.ones(2, dtype=torch.bool)}, "step_mask must"),
    ({"kl": torch.zeros(3, 3)}, "kl must"),
    ({"clip_eps": 0.0}, "clip_eps must")])
def test_image_loss_bad_inputs(kwargs, name):
    """The message starts with the argument's name."""
    args = {"logp": torch.zeros(2, 3), "logp_old": torch.zeros(2, 3), "adv": torch.zeros(2)} | kwargs
    with pytest.raises(ValueError, match=f"^{name}"):
        image_ppo_loss(args.pop("logp"), args.pop("logp_old"), args.pop("adv"), **args)


@pytest.mark.parametrize("kwargs,name", [
    ({"logp": torch.zeros(6)}, r"logp must have shape \(B, T\), got \(6,\)"),
    ({"logp_old": torch.zeros(2, 4)}, "logp_old must"),
    ({"mask": torch.ones(2, 4, dtype=torch.bool)}, "mask must"),
    ({"adv": torch.zeros(3)}, "adv must"),
    ({"logp_ref": torch.zeros(2)}, "logp_ref must"),
    ({"level": "chunk"}, "level must"),
    ({"clip_low": 1.5}, "clip_low must"),
    # the clip range's edges: clip_low in (0, 1) open, clip_high > 0
    ({"clip_low": 0.0}, "clip_low must"),
    ({"clip_low": 1.0}, "clip_low must"),
    ({"clip_high": 0.0}, "clip_low must lie in \\(0, 1\\) and clip_high be > 0, got 0.2, 0.0")])
def test_text_loss_bad_inputs(kwargs, name):
    """The message starts with the argument's name."""
    args = {"logp": torch.zeros(2, 3), "logp_old": torch.zeros(2, 3), "mask": torch.ones(2, 3, dtype=torch.bool),
            "adv": torch.zeros(2)} | kwargs
    with pytest.raises(ValueError, match=f"^{name}"):
        text_grpo_loss(args.pop("logp"), args.pop("logp_old"), args.pop("mask"), args.pop("adv"), **args)


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


@pytest.mark.parametrize("key,bad,message", [
    ("image_step_loss", torch.zeros(6), r"image_step_loss must have shape \(B, K\), got \(6,\)"),
    ("image_step_mask", torch.ones(2, 2), "image_step_mask must have shape"),
    ("text_loss", torch.zeros(2, 1), "text_loss must have shape"),
    ("text_weight", torch.ones(3), "text_weight must have shape"),
    ("text_weight", -1.0, "text_weight must be >= 0"),
    ("text_weight", torch.tensor([1.0, -0.5]), "text_weight must be >= 0")])
def test_trajectory_loss_bad_inputs(key, bad, message):
    ok = {"image_step_loss": torch.zeros(2, 3), "image_step_mask": torch.ones(2, 3, dtype=torch.bool),
          "text_loss": torch.zeros(2), "text_weight": 1.0}
    with pytest.raises(ValueError, match=f"^{message}"):
        trajectory_loss(**(ok | {key: bad}))


def test_text_weight_for():
    assert text_weight_for("rt2i", 10) == 10.0 and text_weight_for("srr", 5) == 1.0
    # no trained image step: RT2I's think text gets weight 0 too, SRR's reflection keeps 1
    assert text_weight_for("rt2i", 0) == 0.0 and text_weight_for("srr", 0) == 1.0
    with pytest.raises(ValueError, match="^mode must"):
        text_weight_for("t2i", 3)
    for bad in (-1, 2.0):
        with pytest.raises(ValueError, match="^n_trained_steps must"):
            text_weight_for("rt2i", bad)


def test_trajectory_loss_with_a_text_weight_below_one():
    """L_b = w l_b / w = l_b for a trajectory with text only, however small w; no floor on the denominator
    but the one that keeps 0 / 0 at 0."""
    step_loss = torch.tensor([[9.0, 9.0], [2.0, 9.0]])
    mask = torch.tensor([[False, False], [True, False]])
    got = trajectory_loss(image_step_loss=step_loss, image_step_mask=mask, text_loss=torch.tensor([3.0, 4.0]),
                          text_weight=torch.tensor([0.25, 0.5]))
    assert got.item() == pytest.approx((3.0 + (2.0 + 0.5 * 4.0) / 1.5) / 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_losses_are_fp32_whatever_the_inputs_dtype(dtype):
    """A bf16 policy's log-probs or fp64 buffers in, fp32 losses out (the same values as fp32 inputs)."""
    gen = torch.Generator().manual_seed(6)
    logp, adv = (torch.randn(3, 4, generator=gen) * 1e-5).to(dtype), torch.randn(3, generator=gen)
    mask = torch.rand(3, 4, generator=gen) > 0.3
    img, _ = image_ppo_loss(logp, torch.zeros(3, 4), adv)
    assert img.dtype == torch.float32 and torch.equal(img, image_ppo_loss(logp.float(), torch.zeros(3, 4), adv)[0])
    txt, _ = text_grpo_loss(logp * 1e4, torch.zeros(3, 4), mask, adv)
    assert txt.dtype == torch.float32
    assert torch.equal(txt, text_grpo_loss((logp * 1e4).float(), torch.zeros(3, 4), mask, adv)[0])
    weight = torch.tensor([4.0, 1.0, 0.5], dtype=dtype)
    for text_loss in (None, txt):
        total = trajectory_loss(image_step_loss=img.to(dtype), image_step_mask=mask, text_loss=text_loss,
                                text_weight=weight)
        want = trajectory_loss(image_step_loss=img.to(dtype).float(), image_step_mask=mask, text_loss=text_loss,
                               text_weight=weight.float())
        assert total.dtype == torch.float32 and torch.equal(total, want)


def test_results_stay_on_the_inputs_device_whatever_the_default_device():
    """Tensors made inside follow the inputs' device, not torch's default one. The meta device stands in
    for the other device on a CPU machine: a tensor made there holds no data, so bool() fails or the
    result lands on meta."""
    logp, adv = torch.tensor([[1e-6, -2e-6], [0.0, 3e-6]]), torch.tensor([1.0, -1.0])
    mask = torch.tensor([[True, False], [True, True]])
    img = image_ppo_loss(logp, torch.zeros(2, 2), adv)[0]
    traj = lambda text_loss: trajectory_loss(image_step_loss=img, image_step_mask=mask,  # noqa: E731
                                             text_loss=text_loss, text_weight=2.0)
    want = [traj(None), traj(adv)]
    with torch.device("meta"):
        got = [image_ppo_loss(logp, torch.zeros(2, 2, device="cpu"), adv)[0], traj(None), traj(adv)]
    assert all(g.device.type == "cpu" for g in got)
    assert torch.equal(got[0], img) and torch.equal(got[1], want[0]) and torch.equal(got[2], want[1])
