"""umm.guidance: CFGConfig defaults and validation, the guidance arithmetic (against plain loops over the
module doc's formulas), and guided_velocity's branches, interval and errors on the tiny model."""
import pytest
import torch

from umm.config import ConfigError
from umm.context import DrawPrompt, Image, Text, encode_guidance
from umm.guidance import RENORM_TYPES, CFGConfig, combine_guidance, guided_velocity

from tests.umm.helpers import rand_image, tiny_model

HW = (2, 2)


# --------------------------------------------------------------------------- CFGConfig

def test_cfg_defaults_are_bagels_t2i_settings():
    cfg = CFGConfig()
    assert (cfg.text_scale, cfg.image_scale, cfg.interval) == (4.0, 1.0, (0.4, 1.0))
    assert (cfg.renorm_type, cfg.renorm_min) == ("global", 0.0)
    assert cfg.uses_text and not cfg.uses_image
    assert RENORM_TYPES == ("none", "global", "channel", "text_channel")


@pytest.mark.parametrize("kwargs", [
    {"text_scale": 1.0}, {"text_scale": 1.5}, {"image_scale": 1.0}, {"image_scale": 1.5},
    {"interval": (0.0, 1.0)}, {"interval": (0.4, 0.41)},
    *({"renorm_type": r} for r in ("none", "global", "channel", "text_channel"))])
def test_cfg_validate_accepts_the_edges(kwargs):
    cfg = CFGConfig(**kwargs)
    assert cfg.validate() is cfg


@pytest.mark.parametrize("kwargs,key", [
    ({"text_scale": 0.99}, "text_scale"), ({"image_scale": 0.5}, "image_scale"),
    ({"interval": (0.5, 0.2)}, "interval"), ({"interval": (0.5, 0.5)}, "interval"),
    ({"interval": (-0.1, 1.0)}, "interval"), ({"interval": (0.4, 1.5)}, "interval"),
    ({"renorm_type": "bogus"}, "renorm_type")])
def test_cfg_validate_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=f"^cfg\\.{key}: "):
        CFGConfig(**kwargs).validate()
    with pytest.raises(ConfigError, match=f"^trainer\\.guidance\\.{key}: "):
        CFGConfig(**kwargs).validate("trainer.guidance")


# --------------------------------------------------------------------------- combine_guidance

def _renorm_loops(v, u, *, per_token, lo):
    """u scaled by clamp(|v| / |u|, lo, 1), per sample or per (sample, latent token)."""
    out = u.clone()
    for b in range(u.shape[0]):
        for idx in ([(b, n) for n in range(u.shape[1])] if per_token else [(b,)]):
            out[idx] = u[idx] * min(1.0, max(lo, (v[idx].norm() / u[idx].norm()).item()))
    return out


def _guided_loops(v, vt, vi, cfg):
    u = v
    if vt is not None:
        u = vt + cfg.text_scale * (v - vt)
        if cfg.renorm_type == "text_channel":
            u = _renorm_loops(v, u, per_token=True, lo=cfg.renorm_min)
    if vi is not None:
        u = vi + cfg.image_scale * (u - vi)
    if cfg.renorm_type in ("global", "channel") and (vt is not None or vi is not None):
        u = _renorm_loops(v, u, per_token=cfg.renorm_type == "channel", lo=cfg.renorm_min)
    return u


@pytest.mark.parametrize("renorm_type", RENORM_TYPES)
@pytest.mark.parametrize("renorm_min", [0.0, 0.5])
@pytest.mark.parametrize("branches", ["text", "image", "text+image"])
def test_combine_guidance_matches_the_formula(renorm_type, renorm_min, branches):
    """u = v_t + s_t (v - v_t); [text_channel: per-token renorm of u]; u' = v_i + s_i (u - v_i);
    [global / channel: renorm of u' per sample / per token]; renorm = clamp(|v| / |u|, renorm_min, 1)."""
    gen = torch.Generator().manual_seed(0)
    v, vt, vi = torch.randn(3, 2, 5, 4, generator=gen).unbind(0)
    vt, vi = (vt if "text" in branches else None), (vi if "image" in branches else None)
    cfg = CFGConfig(text_scale=4.0, image_scale=2.0, renorm_type=renorm_type, renorm_min=renorm_min)
    torch.testing.assert_close(combine_guidance(v, vt, vi, cfg), _guided_loops(v, vt, vi, cfg))


@pytest.mark.parametrize("renorm_type", RENORM_TYPES)
def test_combine_guidance_without_branches_is_v(renorm_type):
    v = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(combine_guidance(v, None, None, CFGConfig(renorm_type=renorm_type)), v)


@pytest.mark.parametrize("renorm_type", ["global", "channel", "text_channel"])
@pytest.mark.parametrize("case", ["short", "tiny"])
def test_renorm_never_lengthens(renorm_type, case):
    """The renorm factor is capped at 1: a guided velocity shorter than v is kept as it is, however short
    (here |u| = |v| / 4, and |u| = 1e-9 against |v| = 1)."""
    if case == "short":
        v = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
        vt = 1.25 * v  # u = 4 v - 3 v_t = v / 4
    else:
        v = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
        vt = torch.tensor([[[2.0, 1e-9, 0.0, 0.0]]])  # u = 2 v - v_t = (0, -1e-9, 0, 0), exact in fp32
    scale = 4.0 if case == "short" else 2.0
    u = vt + scale * (v - vt)
    assert (u.norm(dim=-1) < v.norm(dim=-1) / 3).all()
    got = combine_guidance(v, vt, None, CFGConfig(text_scale=scale, renorm_type=renorm_type, renorm_min=0.0))
    assert torch.equal(got, u)


# --------------------------------------------------------------------------- guided_velocity

@pytest.fixture(scope="module")
def policy():
    """The tiny model, both CFG contexts of two edit prompts, and latents x (2, 4, D)."""
    model = tiny_model()
    img = rand_image(8, 8)
    prompts = [DrawPrompt(prefix=[Image(pixels=img)], text=Text(ids=(5, 6))),
               DrawPrompt(prefix=[Image(pixels=-img)], text=Text(ids=(7, 8, 9)))]
    with torch.no_grad():
        ctx = encode_guidance(model, prompts, text_cfg=True, image_cfg=True)
    x = torch.randn(2, 4, model.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(3))
    return model, ctx, x


def _branches(model, ctx, x, t):
    t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])
    return [model.velocity(x, t, hw=HW, cache=c) for c in (ctx.full, ctx.no_text, ctx.no_image)]


def test_guided_velocity_branches_and_interval(policy):
    model, ctx, x = policy
    cfg = CFGConfig(text_scale=3.0, image_scale=1.5, interval=(0.4, 1.0), renorm_type="none")
    with torch.no_grad():
        v, vt, vi = _branches(model, ctx, x, 0.7)
        got = guided_velocity(model, x, 0.7, hw=HW, contexts=ctx, cfg=cfg)
        torch.testing.assert_close(got, vi + 1.5 * (vt + 3.0 * (v - vt) - vi))
        assert (vt - v).abs().max() > 1e-4 and (vi - v).abs().max() > 1e-4
        # outside the interval: bit-identical to the conditional velocity
        out = guided_velocity(model, x, 0.3, hw=HW, contexts=ctx, cfg=cfg)
        assert torch.equal(out, _branches(model, ctx, x, 0.3)[0])
        # per-row t: each row behaves as it would alone
        mixed = guided_velocity(model, x, torch.tensor([0.7, 0.3]), hw=HW, contexts=ctx, cfg=cfg)
        torch.testing.assert_close(mixed[0], got[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(mixed[1], out[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("text_scale,image_scale", [(1.0, 1.0), (4.0, 1.0), (1.0, 2.0), (4.0, 2.0)])
def test_a_scale_of_one_leaves_its_branch_out(policy, text_scale, image_scale):
    """Both CFG contexts are encoded; a scale of 1.0 switches its branch off entirely, not merely to a
    factor 1 (v_t + 1 (v - v_t) is v only up to rounding): the result is bit for bit the guidance over
    the branches that are on, and v itself when none is."""
    model, ctx, x = policy
    cfg = CFGConfig(text_scale=text_scale, image_scale=image_scale)
    with torch.no_grad():
        v, vt, vi = _branches(model, ctx, x, 0.7)
        got = guided_velocity(model, x, 0.7, hw=HW, contexts=ctx, cfg=cfg)
    want = combine_guidance(v, vt if text_scale > 1 else None, vi if image_scale > 1 else None, cfg)
    assert torch.equal(got, want)
    assert torch.equal(got, v) == (text_scale == image_scale == 1.0)


@pytest.mark.parametrize("interval", [None, (0.25, 0.5)])
def test_guidance_interval_is_open_below_and_closed_above(policy, interval):
    """Active for interval[0] < t <= interval[1] (default (0.4, 1.0]): t = interval[0] is unguided,
    t = interval[1] guided."""
    model, ctx, x = policy
    cfg = CFGConfig() if interval is None else CFGConfig(interval=interval)
    lo, hi = cfg.interval
    t = torch.tensor([lo, hi])
    with torch.no_grad():
        v, vt, _ = _branches(model, ctx, x, t)
        got = guided_velocity(model, x, t, hw=HW, contexts=ctx, cfg=cfg)
    assert torch.equal(got[0], v[0])
    assert torch.equal(got[1], combine_guidance(v, vt, None, cfg)[1]) and not torch.equal(got[1], v[1])


def test_the_interval_takes_t_by_its_value_whatever_its_dtype(policy):
    """A bf16 t = 0.400390625 lies inside (0.4, 1.0], although 0.4 rounded to bf16 is that same number."""
    model, ctx, x = policy
    t = torch.full((2,), 0.400390625, dtype=torch.bfloat16)
    with torch.no_grad():
        got = guided_velocity(model, x, t, hw=HW, contexts=ctx, cfg=CFGConfig())
        v, vt, _ = _branches(model, ctx, x, t.float())
    assert torch.equal(got, combine_guidance(v, vt, None, CFGConfig()))


def test_branches_run_only_where_guidance_is_active(policy):
    """Each branch is a full forward: outside the interval, or with guidance off, only the conditional
    one runs (counted at the velocity head, which runs once per forward)."""
    model, ctx, x = policy
    calls = []
    handle = model.llm2vae.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            for t, cfg, forwards in [(0.3, CFGConfig(image_scale=1.5), 1), (0.7, CFGConfig(text_scale=1.0), 1),
                                     (torch.tensor([0.3, 0.7]), CFGConfig(image_scale=1.5), 3),
                                     (0.7, CFGConfig(), 2)]:
                calls.clear()
                guided_velocity(model, x, t, hw=HW, contexts=ctx, cfg=cfg)
                assert len(calls) == forwards, (t, cfg)
    finally:
        handle.remove()


@pytest.mark.parametrize("text_cfg,image_cfg,cfg,message", [
    (False, True, CFGConfig(), "^text CFG is on but the no-text context was not encoded$"),
    (False, False, CFGConfig(text_scale=1.0, image_scale=1.5),
     "^image CFG is on but the no-image context was not encoded$"),
    (True, False, CFGConfig(image_scale=1.5), "^image CFG is on but the no-image context was not encoded$")])
def test_guidance_without_its_context_is_refused(policy, text_cfg, image_cfg, cfg, message):
    model, _, x = policy
    img = rand_image(8, 8)
    with torch.no_grad():
        ctx = encode_guidance(model, [DrawPrompt(prefix=[Image(pixels=img)], text=Text(ids=(5,)))] * 2,
                              text_cfg=text_cfg, image_cfg=image_cfg)
        with pytest.raises(ValueError, match=message):
            guided_velocity(model, x, 0.5, hw=HW, contexts=ctx, cfg=cfg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_guided_velocity_follows_the_latents_device_not_the_default_one(policy):
    """A trainer may set its default device to cuda and run a CPU model (or the reverse): t and the
    interval mask live on x_t's device (where() refuses a condition on another device)."""
    model, ctx, x = policy
    with torch.no_grad():
        want = guided_velocity(model, x, 0.7, hw=HW, contexts=ctx, cfg=CFGConfig())
        with torch.device("cuda"):
            got = guided_velocity(model, x, 0.7, hw=HW, contexts=ctx, cfg=CFGConfig())
    assert got.device.type == "cpu" and torch.equal(got, want)
