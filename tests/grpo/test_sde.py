"""grpo.sde against independent computations: hand formulas, torch.distributions, a plain Euler loop."""
import math
import re

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from grpo.sde import (
    NoiseBasis,
    check_window,
    euler_step,
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
    transition_kl,
)

SHAPE = torch.Size((4, 3, 5, 5))


def _xv(seed=0, shape=SHAPE, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def test_schedule_endpoints_monotone_and_shift_formula():
    ts = timestep_schedule(16)         # shift defaults to 3
    assert ts.shape == (17,) and ts.dtype == torch.float32
    assert ts[0] == 1.0 and ts[-1] == 0.0
    assert (ts[1:] < ts[:-1]).all()
    for i in range(17):
        u = 1.0 - i / 16
        assert ts[i].item() == pytest.approx(3 * u / (1 + 2 * u), abs=1e-7)
    assert torch.allclose(timestep_schedule(8, shift=1.0), torch.linspace(1, 0, 9))
    assert timestep_schedule(1).tolist() == [1.0, 0.0]      # one step is allowed


@pytest.mark.parametrize("num_steps,shift", [(10, 3.0), (40, 3.0), (40, 2.0), (40, 1.0)])
def test_schedule_is_the_float64_formula_rounded_once(num_steps, shift):
    """The documented rounding: float64 arithmetic, one rounding to fp32 (the same formula in fp32 is an
    ulp off on some steps of these schedules)."""
    us = [1.0 - i / num_steps for i in range(num_steps + 1)]
    want = torch.tensor([shift * u / (1.0 + (shift - 1.0) * u) for u in us], dtype=torch.float64).float()
    assert torch.equal(timestep_schedule(num_steps, shift=shift), want)


@pytest.mark.parametrize("kwargs,name", [({"num_steps": 0}, "num_steps"), ({"num_steps": 4, "shift": 0.0}, "shift")])
def test_schedule_rejects_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        timestep_schedule(**kwargs)


def test_t_cap_is_the_largest_timestep_below_one():
    assert t_cap_of(torch.tensor([1.0, 0.5])) == 0.5
    assert t_cap_of(torch.tensor([1.0, 0.75, 0.25, 0.0])) == 0.75
    for ts in ([1.0], [1.0, 0.0]):    # nothing in (0, 1), e.g. a one-step schedule: no cap for sigma at t = 1
        with pytest.raises(ValueError, match=r"^timesteps must contain a value in \(0, 1\)"):
            t_cap_of(torch.tensor(ts))


def test_sigma_formula_and_both_conventions_at_t_equal_one():
    ts = timestep_schedule(10)
    t_cap = t_cap_of(ts)
    assert t_cap == ts[1].item()
    for at_one in ("flow_grpo", "capped"):
        for t in [0.3, 0.7, t_cap]:       # below the cap both are the formula itself
            got = sde_sigma(t, noise_level=0.7, t_cap=t_cap, at_one=at_one).item()
            assert got == pytest.approx(0.7 * math.sqrt(t / (1 - t)), rel=1e-6)
    # t = 1: Flow-GRPO's code caps only the denominator, "capped" uses sigma(t_cap) whole
    theirs = sde_sigma(1.0, noise_level=0.7, t_cap=t_cap)
    assert theirs.item() == pytest.approx(0.7 * math.sqrt(1 / (1 - t_cap)), rel=1e-6)
    capped = sde_sigma(1.0, noise_level=0.7, t_cap=t_cap, at_one="capped")
    assert capped == sde_sigma(t_cap, noise_level=0.7, t_cap=t_cap)
    assert (theirs / capped).item() == pytest.approx(1 / math.sqrt(t_cap), rel=1e-6)
    # the factors quoted in the docstring
    for steps, shift, factor in [(16, 3.0, 1.011), (10, 1.0, 1.054)]:
        tc = t_cap_of(timestep_schedule(steps, shift=shift))
        ratio = sde_sigma(1.0, noise_level=1.0, t_cap=tc) / sde_sigma(1.0, noise_level=1.0, t_cap=tc, at_one="capped")
        assert ratio.item() == pytest.approx(factor, abs=1e-3)
    assert sde_sigma(0.5, noise_level=0.0, t_cap=0.9).item() == 0.0      # noise_level 0: no noise, allowed
    # fp32 whatever t's dtype, with t's shape
    sigma64 = sde_sigma(torch.tensor([0.3, 0.7], dtype=torch.float64), noise_level=0.7, t_cap=t_cap)
    assert sigma64.dtype == torch.float32 and sigma64.shape == (2,)
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="t_cap"):
            sde_sigma(0.5, noise_level=0.7, t_cap=bad)
    with pytest.raises(ValueError, match="noise_level"):
        sde_sigma(0.5, noise_level=-1.0, t_cap=0.9)
    with pytest.raises(ValueError, match="at_one"):
        sde_sigma(0.5, noise_level=0.7, t_cap=0.9, at_one="clamp")


def _flow_grpo_step(x, v, sigmas, i, noise_level, x_next):
    """Flow-GRPO's SDE step as its paper and released code define it, in float64, on a sigma table
    (sigmas[0] = 1): std_dev_t = a sqrt(s / (1 - (s_max if s == 1 else s))), s_max = sigmas[1];
    mean = x (1 + std^2 dt / (2 s)) + v (1 + std^2 (1 - s) / (2 s)) dt; log-prob of x_next under
    N(mean, (std sqrt(-dt))^2), mean over elements."""
    x, v, x_next = x.double(), v.double(), x_next.double()
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    dt = s_next - s
    std_dev_t = noise_level * math.sqrt(s / (1 - (float(sigmas[1]) if s == 1 else s)))
    mean = x * (1 + std_dev_t**2 / (2 * s) * dt) + v * (1 + std_dev_t**2 * (1 - s) / (2 * s)) * dt
    std = std_dev_t * math.sqrt(-dt)
    logp = (-((x_next - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi))
    return mean, std, logp.mean(dim=tuple(range(1, x.dim()))), std_dev_t


@pytest.mark.parametrize("num_steps,shift", [(16, 3.0), (10, 1.0)])
def test_default_step_equals_flow_grpo_on_every_step_including_t_equal_one(num_steps, shift):
    ts = timestep_schedule(num_steps, shift=shift)
    t_cap = t_cap_of(ts)
    for i in range(num_steps - 1):
        x, v = _xv(20 + i)
        eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))
        step = sde_step(x, v, ts[i], ts[i + 1], noise_level=0.7, t_cap=t_cap, eps=eps)
        mean, std, logp, _ = _flow_grpo_step(x, v, ts, i, 0.7, step.x_next)
        torch.testing.assert_close(step.mean.double(), mean, atol=2e-6, rtol=0)
        assert float(step.std) == pytest.approx(std, rel=1e-6)
        torch.testing.assert_close(step.logp.double(), logp, atol=1e-5, rtol=0)
        capped = sde_step(x, v, ts[i], ts[i + 1], noise_level=0.7, t_cap=t_cap, eps=eps, at_one="capped")
        if i == 0:     # the conventions differ at t = 1 only
            assert float(capped.std) == pytest.approx(std * math.sqrt(t_cap), rel=1e-6)
        else:
            assert torch.equal(capped.x_next, step.x_next) and torch.equal(capped.logp, step.logp)


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


def test_timesteps_must_be_scalar_or_one_per_sample():
    x, v = _xv()
    for bad in (torch.full((3,), 0.5), torch.full((4, 1), 0.5)):
        with pytest.raises(ValueError, match=r"^t must be a float, a 0-d tensor or shape \(4,\), got \("):
            sde_mean_std(x, v, bad, 0.4, noise_level=0.7, t_cap=0.9)
    # a batch of one must not broadcast to a (3,) t's batch of three
    with pytest.raises(ValueError, match=r"shape \(1,\), got \(3,\)"):
        sde_mean_std(x[:1], v[:1], torch.full((3,), 0.5), 0.4, noise_level=0.7, t_cap=0.9)


def test_mean_std_in_fp32_from_bf16_inputs():
    x, v = _xv(dtype=torch.bfloat16)
    mean, std = sde_mean_std(x, v, 0.5, 0.4, noise_level=0.7, t_cap=0.9)
    assert mean.dtype == torch.float32 and std.dtype == torch.float32
    # per-sample timesteps from a float64 schedule do not promote the results to float64 either
    t64 = torch.tensor([0.5, 0.6, 0.7, 0.8], dtype=torch.float64)
    mean, std = sde_mean_std(x, v, t64, t64 - 0.1, noise_level=0.7, t_cap=0.9)
    assert mean.dtype == torch.float32 and std.dtype == torch.float32
    assert euler_step(x, v, t64, t64 - 0.1).dtype == torch.float32
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
    assert torch.equal(step.mean, step.x_next) and step.std.shape == () and step.std.item() == 0.0
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
    with pytest.raises(ValueError, match=r"^mean_ref must have mean's shape \(4, 3, 5, 5\), got \(2, 3, 5, 5\)"):
        kl_to_reference(m, m_ref[:2], std)


def test_transition_kl_scales_exact_and_flow_grpo():
    """"exact" is the two transitions' Gaussian KL (std = sigma_t sqrt(-dt)); "flow_grpo" is the code's
    ||dmu||^2 mean / (2 std_dev_t^2) with std_dev_t = sigma_t, i.e. (-dt) times the exact one."""
    ts = timestep_schedule(16)
    t_cap = t_cap_of(ts)
    x, v = _xv(11)
    _, v_ref = _xv(12)
    for i in (0, 3, 9):
        t, t_next = ts[i], ts[i + 1]
        mean, std = sde_mean_std(x, v, t, t_next, noise_level=0.7, t_cap=t_cap)
        mean_ref, _ = sde_mean_std(x, v_ref, t, t_next, noise_level=0.7, t_cap=t_cap)
        exact = transition_kl(mean, mean_ref, std, t_next - t, scale="exact")
        want_exact = torch.stack([Normal(mean[b].double(), float(std)).log_prob(mean[b].double()).mean()
                                  - Normal(mean_ref[b].double(), float(std)).log_prob(mean[b].double()).mean()
                                  for b in range(4)])
        torch.testing.assert_close(exact.double(), want_exact, rtol=1e-4, atol=0)
        _, _, _, std_dev_t = _flow_grpo_step(x, v, ts, i, 0.7, x)
        theirs = ((mean.double() - mean_ref.double()) ** 2).mean(dim=(1, 2, 3)) / (2 * std_dev_t**2)
        got = transition_kl(mean, mean_ref, std, t_next - t)
        torch.testing.assert_close(got.double(), theirs, rtol=1e-4, atol=0)
        torch.testing.assert_close(got, exact * float(t - t_next), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="scale"):
        transition_kl(mean, mean_ref, std, -0.1, scale="nats")
    # per-sample dt (B,), even float64, scales each row and keeps the result fp32
    dt64 = torch.tensor([-0.1, -0.2, -0.3, -0.4], dtype=torch.float64)
    per_sample = transition_kl(mean, mean_ref, std, dt64)
    assert per_sample.dtype == torch.float32
    torch.testing.assert_close(per_sample, exact * dt64.abs().float(), rtol=1e-6, atol=0)
    for dt in (0.1, 0.0):          # dt = t_next - t must be strictly negative
        with pytest.raises(ValueError, match="dt"):
            transition_kl(mean, mean_ref, std, dt)


def test_recompute_steps_kl_uses_the_scale_asked_for():
    d = SHAPE[1:].numel()
    w = torch.randn(d, d, generator=torch.Generator().manual_seed(8)) * 0.1
    ts = timestep_schedule(8)
    traj = sample_flow(_linear_velocity(w), torch.randn(2, *SHAPE[1:]), timesteps=ts, sde_steps=[0, 2, 4],
                       noise_level=0.7, generator=torch.Generator().manual_seed(2))
    ref = _linear_velocity(w * 0.8)
    exact = recompute_steps(_linear_velocity(w), traj, ref_velocity_fn=ref, kl_scale="exact").kl
    theirs = recompute_steps(_linear_velocity(w), traj, ref_velocity_fn=ref).kl
    for row, i in enumerate([0, 2, 4]):
        x, t, t_next = traj.latents[i], ts[i], ts[i + 1]
        mean, std = sde_mean_std(x, _linear_velocity(w)(x, t, i), t, t_next, noise_level=0.7, t_cap=t_cap_of(ts))
        mean_ref, _ = sde_mean_std(x, ref(x, t, i), t, t_next, noise_level=0.7, t_cap=t_cap_of(ts))
        torch.testing.assert_close(exact[row], kl_to_reference(mean, mean_ref, std))
        torch.testing.assert_close(theirs[row], exact[row] * float(t - t_next))
    assert float(exact.min()) > 0


def test_window_never_contains_last_step_and_start_in_range():
    # RT2I, SRR, and the edges: two steps (the shortest schedule with a trainable step), lo == hi
    for num_steps, k, rng in [(16, 10, (0, 1)), (40, 5, (0, 14)), (3, 1, (0, 1)), (12, 4, (2, 7)), (2, 1, (0, 0)),
                              (12, 4, (3, 3))]:
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
        (10, {"window_size": 4, "start_range": (0, 6)}, "start_range"),   # reaches step 9, the last
        (16, {"window_size": 2, "start_range": (0, 1, 2)}, "start_range"),
    ],
)
def test_window_rejects_bad_args(num_steps, kwargs, name):
    with pytest.raises(ValueError, match=name):
        sde_window(num_steps, **kwargs)


def test_window_error_names_the_step_reached_and_the_last_step():
    with pytest.raises(ValueError, match=r"reaches step 12; the window must end before the last step 11$"):
        check_window(12, window_size=4, start_range=(2, 9))


def _linear_velocity(w):
    """v = W x (flattened per sample) plus a t-dependent term; a fixed 'model'."""

    def fn(x, t, i):
        flat = x.reshape(x.shape[0], -1) @ w.T
        return flat.reshape(x.shape) + 0.1 * t * x

    return fn


@pytest.mark.parametrize("batch,at_one", [(1, "flow_grpo"), (4, "flow_grpo"), (4, "capped")])
def test_sample_flow_then_recompute_is_on_policy(batch, at_one):
    d = SHAPE[1:].numel()
    w = torch.randn(d, d, generator=torch.Generator().manual_seed(8)) * 0.1
    x0 = torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(9))
    ts = timestep_schedule(10)
    window = range(0, 4)       # includes t = 1, where the conventions differ
    traj = sample_flow(_linear_velocity(w), x0, timesteps=ts, sde_steps=window, noise_level=0.7,
                       generator=torch.Generator().manual_seed(10), sigma_at_one=at_one)
    assert traj.sigma_at_one == at_one
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
    # the reference transition uses the trajectory's sigma convention too: KL to itself is 0, also at t = 1
    assert recompute_steps(_linear_velocity(w), traj, ref_velocity_fn=_linear_velocity(w)).kl.abs().max() == 0
    with pytest.raises(ValueError, match="steps"):
        recompute_logp(_linear_velocity(w), traj, steps=[9])


def test_recompute_carries_gradient_to_velocity_params():
    d = SHAPE[1:].numel()
    w = (torch.randn(d, d, generator=torch.Generator().manual_seed(8)) * 0.1).requires_grad_()
    traj = sample_flow(_linear_velocity(w), torch.randn(2, *SHAPE[1:]), timesteps=timestep_schedule(5),
                       sde_steps={0, 1}, noise_level=0.7)
    recompute_logp(_linear_velocity(w), traj).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_velocity_fn_gets_the_step_index_and_an_fp32_time():
    """velocity_fn(x, t, i) as documented, in sampling and in re-scoring (guidance may depend on i); a
    float64 schedule is stored and passed on as fp32."""
    calls = []

    def fn(x, t, i):
        calls.append((i, t.dtype, t.dim()))
        return -x

    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    ts64 = timestep_schedule(5).double()
    traj = sample_flow(fn, x, timesteps=ts64, sde_steps=[1, 3], noise_level=0.7)
    assert calls == [(i, torch.float32, 0) for i in range(5)]
    assert traj.timesteps.dtype == torch.float32 and torch.equal(traj.timesteps, timestep_schedule(5))
    calls.clear()
    recompute_steps(fn, traj, ref_velocity_fn=fn)
    assert [c[0] for c in calls] == [1, 1, 3, 3]      # policy and reference, per step


def test_one_step_and_ode_only_paths():
    """A one-step schedule [1, 0] has no t_cap (nothing in (0, 1)): it must only be asked for when a step is
    an SDE step with noise. Without SDE steps the log-probs are empty (0, B)."""
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))     # B = 2 != x.shape[1]
    ts = timestep_schedule(1)
    for sde_steps, noise_level in [([], 0.7), ([0], 0.0), ([], 0.0)]:
        traj = sample_flow(lambda x, t, i: 2 * x, x, timesteps=ts, sde_steps=sde_steps, noise_level=noise_level)
        assert torch.equal(traj.latents[-1], x - 2 * x)         # x + v * (0 - 1)
        assert traj.logp.shape == (len(sde_steps), 2) and not traj.logp.any()
    # re-scoring no steps: empty (0, B) log-probs and KLs
    traj = sample_flow(lambda x, t, i: x, x, timesteps=timestep_schedule(4), sde_steps=[1, 2], noise_level=0.7)
    none = recompute_steps(lambda x, t, i: x, traj, ref_velocity_fn=lambda x, t, i: x, steps=[])
    assert none.logp.shape == (0, 2) and none.kl.shape == (0, 2)
    assert recompute_steps(lambda x, t, i: x, traj, steps=[]).kl is None


def test_sample_flow_rejects_bad_inputs():
    x = torch.randn(2, 3)
    ts = timestep_schedule(4)
    with pytest.raises(ValueError, match=r"^sde_steps must lie in \[0, 3\], got \[4\]"):
        sample_flow(lambda x, t, i: x, x, timesteps=ts, sde_steps={4}, noise_level=0.7)
    with pytest.raises(ValueError, match="velocity_fn"):
        sample_flow(lambda x, t, i: x[:1], x, timesteps=ts, sde_steps={0}, noise_level=0.7)
    for bad in (ts.reshape(1, 5), ts[:1]):
        want = f"timesteps must be 1-D with >= 2 values, got shape {tuple(bad.shape)}"
        with pytest.raises(ValueError, match=re.escape(want)):
            sample_flow(lambda x, t, i: x, x, timesteps=bad, sde_steps=set(), noise_level=0.7)
    with pytest.raises(ValueError, match="^noise_level must be >= 0"):
        sample_flow(lambda x, t, i: x, x, timesteps=ts, sde_steps={0}, noise_level=-0.1)
    ode = sample_flow(lambda x, t, i: x, x, timesteps=ts, sde_steps={0}, noise_level=0.0)
    with pytest.raises(ValueError, match=r"^traj\.noise_level must be > 0"):
        recompute_steps(lambda x, t, i: x, ode)


def test_outputs_stay_on_the_inputs_device():
    """Run under `torch.device("meta")` on CPU inputs (docs/testing.md): a tensor made on the default device
    instead of the inputs' one holds no data there, so the call fails or its output leaves the CPU."""
    x, v = _xv(13)
    tb = torch.tensor([0.9, 0.6, 0.3, 0.2])
    fn = _linear_velocity(torch.eye(SHAPE[1:].numel()) * 0.1)
    ts = timestep_schedule(4)
    traj = sample_flow(fn, x, timesteps=ts, sde_steps=[1, 2], noise_level=0.7)
    want_step = sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, generator=torch.Generator().manual_seed(0))
    want_mean, want_std = sde_mean_std(x, v, tb, tb - 0.1, noise_level=0.7, t_cap=0.9)
    want_kl = transition_kl(x, v, want_std, -0.1)
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        step = sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, generator=gen)
        ode = sde_step(x, v, 0.8, 0.7, noise_level=0.0, t_cap=0.9)
        mean, std = sde_mean_std(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9)
        mean_b, std_b = sde_mean_std(x, v, tb, tb - 0.1, noise_level=0.7, t_cap=0.9)
        kl = transition_kl(x, v, want_std, -0.1)
        ode_traj = sample_flow(fn, x, timesteps=ts, sde_steps=[], noise_level=0.7)
        none = recompute_steps(fn, traj, ref_velocity_fn=fn, steps=[])
    outputs = [step.x_next, step.logp, ode.std, ode.logp, mean, std, mean_b, kl, ode_traj.logp, none.logp, none.kl]
    assert all(o.device.type == "cpu" for o in outputs)
    assert torch.equal(step.x_next, want_step.x_next) and torch.equal(step.logp, want_step.logp)
    assert torch.equal(mean_b, want_mean) and torch.equal(std_b, want_std) and torch.equal(kl, want_kl)
    assert torch.equal(ode.logp, torch.zeros(4)) and ode_traj.logp.shape == (0, 4)
    # the schedule moves to the latents' device (meta latents, CPU schedule)
    on_meta = sample_flow(lambda x, t, i: x, x.to("meta"), timesteps=ts, sde_steps=[], noise_level=0.7)
    assert on_meta.timesteps.device.type == "meta"


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_outputs_are_fp32_under_a_float64_default_dtype(float64_default):
    """Also the noise: a seed gives the generator's fp32 normal draw (a float64 draw is other numbers)."""
    x, v = _xv(14)
    ode = sde_step(x, v, 0.8, 0.7, noise_level=0.0, t_cap=0.9)
    sde = sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, generator=torch.Generator().manual_seed(0))
    traj = sample_flow(lambda x, t, i: -x, x, timesteps=timestep_schedule(4), sde_steps=[1], noise_level=0.7)
    ode_traj = sample_flow(lambda x, t, i: -x, x, timesteps=timestep_schedule(4), sde_steps=[], noise_level=0.7)
    none = recompute_steps(lambda x, t, i: -x, traj, ref_velocity_fn=lambda x, t, i: -x, steps=[])
    outputs = [ode.x_next, ode.mean, ode.std, ode.logp, sde.x_next, sde.mean, sde.std, sde.logp, traj.latents,
               traj.logp, ode_traj.logp, none.logp, none.kl]
    assert all(o.dtype == torch.float32 for o in outputs)
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert torch.equal(sde.x_next, sde.mean + sde.std * eps)


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
    for block in (3, 0):
        with pytest.raises(ValueError, match=rf"^noise block {block} must be >= 1 and divide the latent grid 4x6$"):
            _basis(block=block)
    with pytest.raises(ValueError, match=r"^latents must have shape \(B, 6, 12\), got \(1, 5, 12\)$"):
        basis.means(torch.zeros(1, 5, 12))


def test_block_one_basis_is_isotropic_noise():
    """K = 1: every latent pixel is its own block, i.e. Flow-GRPO (basis None); eps comes on the pixel grid."""
    basis = _basis(block=1)
    x, v = (torch.randn(4, 6, 12, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    z = torch.randn(4, 4, 6, 3, generator=torch.Generator().manual_seed(3))
    step = sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, eps=z, basis=basis)
    iso = sde_step(x, v, 0.8, 0.7, noise_level=0.7, t_cap=0.9, eps=basis.expand(z))
    assert torch.allclose(step.x_next, iso.x_next, atol=1e-6) and torch.allclose(step.std, iso.std)
    assert torch.allclose(step.logp, iso.logp, atol=1e-6)


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
    logp, _, _ = step_logp(x, v, t, t_next, batched.x_next, noise_level=0.7, t_cap=0.9, basis=basis)
    assert torch.equal(logp, batched.logp)


def test_block_noise_kl_is_between_the_block_mean_gaussians():
    basis = _basis()
    w = torch.randn(72, 72, generator=torch.Generator().manual_seed(4)) * 0.1
    fn, ref = _linear_velocity(w), _linear_velocity(w * 0.8)
    ts = timestep_schedule(6)
    traj = sample_flow(fn, torch.randn(2, 6, 12, generator=torch.Generator().manual_seed(5)), timesteps=ts,
                       sde_steps=[0, 2], noise_level=0.7, generator=torch.Generator().manual_seed(6), basis=basis)
    kl = recompute_steps(fn, traj, ref_velocity_fn=ref, kl_scale="exact").kl
    for row, i in enumerate([0, 2]):
        x, t, t_next = traj.latents[i], ts[i], ts[i + 1]
        mean, std = sde_mean_std(x, fn(x, t, i), t, t_next, noise_level=0.7, t_cap=t_cap_of(ts), basis=basis)
        mean_ref, _ = sde_mean_std(x, ref(x, t, i), t, t_next, noise_level=0.7, t_cap=t_cap_of(ts), basis=basis)
        want = kl_divergence(Normal(basis.means(mean).double(), float(std)),
                             Normal(basis.means(mean_ref).double(), float(std))).mean(dim=(1, 2, 3))
        torch.testing.assert_close(kl[row].double(), want, rtol=1e-4, atol=0)


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
