"""grpo.sde against independent computations: hand formulas, torch.distributions, a plain Euler loop."""
import math

import pytest
import torch
from torch.distributions import Normal

from grpo.sde import (
    NoiseBasis,
    gaussian_logp,
    kl_to_reference,
    recompute_logp,
    recompute_steps,
    sample_flow,
    sde_mean_std,
    sde_sigma,
    sde_step,
    sde_window,
    step_logp,
    t_cap_of,
    timestep_schedule,
)

SHAPE = torch.Size((4, 3, 5, 5))


def _xv(seed=0, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def test_schedule_endpoints_monotone_and_shift_formula():
    ts = timestep_schedule(16, shift=3.0)
    assert ts.shape == (17,) and ts.dtype == torch.float32
    assert ts[0] == 1.0 and ts[-1] == 0.0
    assert (ts[1:] < ts[:-1]).all()
    for i in range(17):
        u = 1.0 - i / 16
        assert ts[i].item() == pytest.approx(3 * u / (1 + 2 * u), abs=1e-7)
    assert torch.allclose(timestep_schedule(8, shift=1.0), torch.linspace(1, 0, 9))


@pytest.mark.parametrize("kwargs,name", [({"num_steps": 0}, "num_steps"), ({"num_steps": 4, "shift": 0.0}, "shift")])
def test_schedule_rejects_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        timestep_schedule(**kwargs)


def test_sigma_formula_and_cap_at_t_equal_one():
    ts = timestep_schedule(10)
    t_cap = t_cap_of(ts)
    assert t_cap == ts[1].item()
    for t in [0.3, 0.7, t_cap]:
        assert sde_sigma(t, noise_level=0.7, t_cap=t_cap).item() == pytest.approx(0.7 * math.sqrt(t / (1 - t)), rel=1e-6)
    at_one = sde_sigma(1.0, noise_level=0.7, t_cap=t_cap)
    assert torch.isfinite(at_one) and at_one == sde_sigma(t_cap, noise_level=0.7, t_cap=t_cap)
    with pytest.raises(ValueError, match="t_cap"):
        sde_sigma(0.5, noise_level=0.7, t_cap=1.0)
    with pytest.raises(ValueError, match="noise_level"):
        sde_sigma(0.5, noise_level=-1.0, t_cap=0.9)


def test_mean_std_matches_hand_formula_float_and_per_sample_t():
    x, v = _xv()
    a, t, t_next, t_cap = 0.7, 0.6, 0.45, 0.95
    mean, std = sde_mean_std(x, v, t, t_next, noise_level=a, t_cap=t_cap)
    sigma = a * math.sqrt(t / (1 - t))
    dt = t_next - t
    assert torch.allclose(mean, x + (v + sigma**2 / (2 * t) * (x + (1 - t) * v)) * dt, atol=1e-6)
    assert std.item() == pytest.approx(sigma * math.sqrt(-dt), rel=1e-6)
    # per-sample (B,) timesteps broadcast over latent dims; each row equals its scalar computation
    tb = torch.tensor([0.9, 0.6, 0.3, 0.2])
    tb_next = tb - 0.1
    mean_b, std_b = sde_mean_std(x, v, tb, tb_next, noise_level=a, t_cap=t_cap)
    assert mean_b.shape == x.shape and std_b.shape == (4, 1, 1, 1)
    for b in range(4):
        m1, s1 = sde_mean_std(x[b : b + 1], v[b : b + 1], tb[b], tb_next[b], noise_level=a, t_cap=t_cap)
        assert torch.allclose(mean_b[b : b + 1], m1) and torch.allclose(std_b[b], s1)


def test_mean_std_in_fp32_from_bf16_inputs():
    x, v = _xv(dtype=torch.bfloat16)
    mean, std = sde_mean_std(x, v, 0.5, 0.4, noise_level=0.7, t_cap=0.9)
    assert mean.dtype == torch.float32 and std.dtype == torch.float32
    with pytest.raises(ValueError, match="v must"):
        sde_mean_std(x, v[:2], 0.5, 0.4, noise_level=0.7, t_cap=0.9)


def test_gaussian_logp_equals_torch_normal_mean_over_elements():
    x, mean = _xv(1)
    for std in [torch.tensor(0.3), torch.rand(4, 1, 1, 1) + 0.1, torch.rand(SHAPE) + 0.1]:
        want = Normal(mean, std).log_prob(x).mean(dim=(1, 2, 3))
        got = gaussian_logp(x, mean, std)
        assert got.shape == (4,)
        assert torch.allclose(got, want, atol=1e-5)


def test_sde_step_logp_and_sample_consistency():
    x, v = _xv(2)
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    step = sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, eps=eps)
    mean, std = sde_mean_std(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9)
    assert torch.equal(step.x_next, mean + std * eps)
    assert torch.allclose(step.logp, Normal(mean, std).log_prob(step.x_next).mean(dim=(1, 2, 3)), atol=1e-5)
    logp, _, _ = step_logp(x, v, 0.8, 0.7, step.x_next, noise_level=0.7, t_cap=0.9)
    assert torch.equal(logp, step.logp)
    # generator-driven noise is reproducible
    s1 = sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, generator=torch.Generator().manual_seed(5))
    s2 = sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1.x_next, s2.x_next)
    with pytest.raises(ValueError, match="eps"):
        sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, eps=eps[:1])
    with pytest.raises(ValueError, match="noise_level"):
        step_logp(x, v, 0.8, 0.7, x, noise_level=0.0, t_cap=0.9)


def test_noise_level_zero_is_exact_euler_ode():
    x, v = _xv(4)
    ts = timestep_schedule(6)
    step = sde_step(x, v, ts[2], ts[3], noise_level=0.0, t_cap=t_cap_of(ts))
    assert torch.equal(step.x_next, x + v * (ts[3] - ts[2]))
    assert torch.equal(step.logp, torch.zeros(4))

    w = torch.randn(SHAPE[1:].numel(), SHAPE[1:].numel(), generator=torch.Generator().manual_seed(6)) * 0.1
    fn = _linear_velocity(w)
    traj = sample_flow(fn, x, timesteps=ts, sde_steps=range(0, 3), noise_level=0.0)
    plain = x.clone()
    for i in range(6):  # the ODE written out by hand
        plain = plain + fn(plain, ts[i], i) * (ts[i + 1] - ts[i])
    assert torch.equal(traj.latents[-1], plain)
    assert torch.equal(traj.logp, torch.zeros(3, 4))


def test_kl_to_reference_formula():
    m, m_ref = _xv(7)
    std = torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(4, 1, 1, 1)
    want = torch.stack([((m[b] - m_ref[b]) ** 2 / (2 * std[b] ** 2)).mean() for b in range(4)])
    assert torch.allclose(kl_to_reference(m, m_ref, std), want)
    assert torch.equal(kl_to_reference(m, m, std), torch.zeros(4))


def test_window_never_contains_last_step_and_start_in_range():
    for num_steps, k, rng in [(16, 10, (0, 1)), (40, 5, (0, 14)), (3, 1, (0, 1)), (12, 4, (2, 7))]:
        gen = torch.Generator().manual_seed(num_steps)
        starts = set()
        for _ in range(200):
            w = sde_window(num_steps, window_size=k, start_range=rng, generator=gen)
            assert len(w) == k and w.step == 1
            assert rng[0] <= w.start <= rng[1]
            assert num_steps - 1 not in w and max(w) <= num_steps - 2
            starts.add(w.start)
        assert starts == set(range(rng[0], rng[1] + 1))  # uniform draw covers the range


@pytest.mark.parametrize(
    "num_steps,kwargs,name",
    [
        (1, {"window_size": 1, "start_range": (0, 0)}, "num_steps"),
        (16, {"window_size": 0, "start_range": (0, 1)}, "window_size"),
        (16, {"window_size": 2, "start_range": (3, 1)}, "start_range"),
        (16, {"window_size": 10, "start_range": (0, 6)}, "start_range"),  # would reach step 15
    ],
)
def test_window_rejects_bad_args(num_steps, kwargs, name):
    with pytest.raises(ValueError, match=name):
        sde_window(num_steps, **kwargs)


def _linear_velocity(w):
    """v = W x (flattened per sample) plus a t-dependent term; a fixed 'model'."""

    def fn(x, t, i):
        flat = x.reshape(x.shape[0], -1) @ w.T
        return flat.reshape(x.shape) + 0.1 * t * x

    return fn


@pytest.mark.parametrize("batch", [1, 4])
def test_sample_flow_then_recompute_is_on_policy(batch):
    d = SHAPE[1:].numel()
    w = torch.randn(d, d, generator=torch.Generator().manual_seed(8)) * 0.1
    x0 = torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(9))
    ts = timestep_schedule(10)
    window = sde_window(10, window_size=4, start_range=(0, 2), generator=torch.Generator().manual_seed(1))
    traj = sample_flow(_linear_velocity(w), x0, timesteps=ts, sde_steps=window, noise_level=0.7,
                       generator=torch.Generator().manual_seed(10))
    assert traj.latents.shape == (11, batch, *SHAPE[1:]) and traj.logp.shape == (4, batch)
    assert traj.sde_steps == list(window) and torch.equal(traj.latents[0], x0)
    logp = recompute_logp(_linear_velocity(w), traj)
    assert logp.shape == (4, batch)
    assert (torch.exp(logp - traj.logp) - 1).abs().max() < 1e-6
    # a subset of steps, and a different policy gives a different log-prob
    sub = recompute_logp(_linear_velocity(w), traj, steps=[window[1]])
    assert torch.equal(sub[0], logp[1])
    other = recompute_logp(_linear_velocity(w * 1.5), traj)
    assert not torch.allclose(other, traj.logp)
    with pytest.raises(ValueError, match="steps"):
        recompute_logp(_linear_velocity(w), traj, steps=[9])


def test_recompute_carries_gradient_to_velocity_params():
    d = SHAPE[1:].numel()
    w = (torch.randn(d, d, generator=torch.Generator().manual_seed(8)) * 0.1).requires_grad_()
    traj = sample_flow(_linear_velocity(w), torch.randn(2, *SHAPE[1:]), timesteps=timestep_schedule(5),
                       sde_steps={0, 1}, noise_level=0.7)
    recompute_logp(_linear_velocity(w), traj).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_sample_flow_rejects_bad_inputs():
    x = torch.randn(2, 3)
    ts = timestep_schedule(4)
    with pytest.raises(ValueError, match="sde_steps"):
        sample_flow(lambda x, t, i: x, x, timesteps=ts, sde_steps={4}, noise_level=0.7)
    with pytest.raises(ValueError, match="velocity_fn"):
        sample_flow(lambda x, t, i: x[:1], x, timesteps=ts, sde_steps={0}, noise_level=0.7)


# --------------------------------------------------------------------------- low-frequency noise

def _basis(block=2, grid=(2, 3), patch=2, channels=3):
    return NoiseBasis(grid=grid, patch=patch, channels=channels, block=block)


def test_noise_basis_block_means_are_avg_pooling_of_the_latent_image():
    from umm.vision import patchify
    basis = _basis()
    image = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(0))       # (c, H, W) latent
    tokens = patchify(image, 2)[None]                                                # (1, h*w, p*p*c)
    pooled = torch.nn.functional.avg_pool2d(image[None], 2)                          # (1, c, H/2, W/2)
    assert torch.allclose(basis.means(tokens), pooled.permute(0, 2, 3, 1), atol=1e-6)
    projected = basis.project(tokens)
    assert torch.allclose(projected, patchify(torch.nn.functional.interpolate(pooled, scale_factor=2)[0], 2)[None],
                          atol=1e-6)
    assert torch.allclose(basis.project(projected), projected, atol=1e-6)           # a projection
    with pytest.raises(ValueError, match="noise block 3"):
        _basis(block=3)
    with pytest.raises(ValueError, match="latents must have shape"):
        basis.means(torch.zeros(1, 5, 12))


def test_block_noise_step_samples_and_scores_block_means():
    basis = _basis()
    x, v = (torch.randn(4, 6, 12, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    z = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(3))
    step = sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, eps=z, basis=basis)
    mean, std = sde_mean_std(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, basis=basis)
    iso_mean, iso_std = sde_mean_std(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9)
    assert torch.allclose(std, iso_std / 2)                       # a block mean of 4 iid draws
    assert not torch.allclose(mean, iso_mean)                     # the score correction is projected
    residual = step.x_next - mean
    assert torch.allclose(basis.project(residual), residual, atol=1e-6)    # noise is block-constant
    expected = Normal(basis.means(mean), std).log_prob(basis.means(step.x_next)).mean(dim=(1, 2, 3))
    assert torch.allclose(step.logp, expected, atol=1e-5)
    logp, _, _ = step_logp(x, v, 0.8, 0.7, step.x_next, noise_level=0.7, t_cap=0.9, basis=basis)
    assert torch.equal(logp, step.logp)
    with pytest.raises(ValueError, match="eps must have shape"):
        sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, eps=torch.zeros_like(x), basis=basis)
    # per-sample timesteps score every row as its own scalar-timestep call would
    t, t_next = torch.tensor([0.8, 0.6, 0.5, 0.3]), torch.tensor([0.7, 0.5, 0.3, 0.2])
    batched = sde_step(x, v, t, t_next, noise_level=0.7, t_cap=0.9, eps=z, basis=basis)
    for b in range(4):
        row = sde_step(x[b:b + 1], v[b:b + 1], float(t[b]), float(t_next[b]), noise_level=0.7, t_cap=0.9,
                       eps=z[b:b + 1], basis=basis)
        assert torch.allclose(batched.x_next[b], row.x_next[0], atol=1e-6)
        assert torch.allclose(batched.logp[b], row.logp[0], atol=1e-5)


def test_block_noise_keeps_the_ode_marginals():
    """Gaussian data with its exact velocity: the final samples must again be iid N(0, s^2). Without
    the projected score correction the variance collapses to ~0.07 and in-block correlation to ~0.8."""
    s, n, batch = 0.5, 40, 8000
    basis = NoiseBasis(grid=(2, 2), patch=2, channels=1, block=2)

    def exact_velocity(x, t, i):      # E[noise - x0 | x_t] for x0 ~ N(0, s^2 I), noise ~ N(0, I)
        t = float(t)
        return (t - (1 - t) * s * s) / ((1 - t) ** 2 * s * s + t * t) * x

    x_init = torch.randn(batch, 4, 4, generator=torch.Generator().manual_seed(0))
    traj = sample_flow(exact_velocity, x_init, timesteps=timestep_schedule(n, shift=1.0), sde_steps=range(n - 1),
                       noise_level=0.7, generator=torch.Generator().manual_seed(1), basis=basis)
    pixels = basis._pixels(traj.latents[-1]).reshape(batch, 16)
    assert abs(float(pixels.var(0).mean()) - s * s) < 0.08 * s * s
    assert float((torch.corrcoef(pixels.T) - torch.eye(16)).abs().max()) < 0.1
    # the learner re-scores the stored path exactly (ratio 1), KL to itself is 0
    scores = recompute_steps(exact_velocity, traj, ref_velocity_fn=exact_velocity, steps=[0, 5])
    assert torch.allclose(scores.logp, traj.logp[[0, 5]], atol=1e-6)
    assert float(scores.kl.abs().max()) == 0.0
