"""Flow-matching SDE sampling and scoring for image-side GRPO (Flow-GRPO, arXiv 2505.05470).

Conventions (BAGEL / rectified flow):

    x_t = (1 - t) * x0 + t * noise        t = 1 is pure noise, t = 0 is data
    v   = noise - x0                      the model's velocity ("data to noise")
    sampling runs t: 1 -> 0; the Euler ODE step is  x_next = x + v * dt,  dt = t_next - t < 0

Flow-GRPO turns the deterministic ODE into an SDE with the same marginals, so each step becomes a
Gaussian policy pi(x_next | x) whose log-density can be trained with PPO:

    sigma_t = noise_level * sqrt(t / (1 - t))          (at t = 1, see `sde_sigma`)
    mean    = x + [v + sigma_t^2 / (2 t) * (x + (1 - t) * v)] * dt
    std     = sigma_t * sqrt(-dt)
    x_next  = mean + std * eps,   eps ~ N(0, I)

Low-frequency exploration (`NoiseBasis`, block K > 1, a documented deviation from Flow-GRPO): the
noise is shared by every K x K block of the latent grid, per channel, so the policy explores only the
block means. The diffusion matrix becomes sigma_t^2 P (P = the projection onto block-constant
latents), and the drift's score correction is projected the same way, which keeps the ODE's
marginals (Fokker-Planck holds for any constant PSD diffusion matrix):

    mean    = x + [v + sigma_t^2 / (2 t) * P(x + (1 - t) * v)] * dt
    x_next  = mean + (std / K) * expand(z),   z ~ N(0, I) on the (H/K, W/K, C) block grid

and the log-prob is the Gaussian density of the block means (std / K each). A block mean gets the
same noise variance as under isotropic noise; only the within-block (high-frequency) noise is gone.
That noise carries no reward signal but dominates the policy gradient's variance: on the shapes
world, K = 4 (192 explored values instead of 3,072) roughly doubled how fast GRPO raised a smooth
reward (docs/architecture.md). K = 1 (basis None) is Flow-GRPO exactly.

One function (`sde_step`) samples; the learner scores stored transitions with `step_logp`, built
from the same `sde_mean_std` + `gaussian_logp`, so on-policy the importance ratio is exactly 1.
Everything here is a pure function of tensors: no model, no scheduler object.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

TimeLike = float | Tensor
VelocityFn = Callable[[Tensor, Tensor, int], Tensor]


# --------------------------------------------------------------------------- schedule

def timestep_schedule(num_steps: int, *, shift: float = 3.0) -> Tensor:
    """The shifted sampling timesteps t_0 = 1 > t_1 > ... > t_N = 0 (fp32, shape (num_steps + 1,)).

        t  = linspace(1, 0, num_steps + 1)
        t' = s * t / (1 + (s - 1) * t)          (s = shift; s > 1 spends more steps at high noise)

    Computed in float64 and rounded once to fp32, so t'_0 == 1 and t'_N == 0 exactly.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * t / (1.0 + (shift - 1.0) * t)).to(torch.float32)


def t_cap_of(timesteps: Tensor) -> float:
    """The largest timestep of a schedule strictly below 1: the value `sde_sigma` uses for t = 1."""
    below_one = timesteps[timesteps < 1.0]
    if below_one.numel() == 0 or not float(below_one.max()) > 0.0:
        raise ValueError("timesteps must contain a value in (0, 1) to cap sigma at t = 1")
    return float(below_one.max())


def _as_time(t: TimeLike, x: Tensor) -> Tensor:
    """A timestep as fp32 on x's device, shaped to broadcast over x: 0-d, or (B,) -> (B, 1, ..., 1)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.dim() == 0:
        return t
    if t.dim() == 1 and t.shape[0] == x.shape[0]:
        return t.reshape(-1, *([1] * (x.dim() - 1)))
    raise ValueError(f"t must be a float, a 0-d tensor or shape ({x.shape[0]},), got {tuple(t.shape)}")


@dataclass(frozen=True, kw_only=True)
class NoiseBasis:
    """Block-constant exploration noise on a patchified latent (see the module docstring).

    Latents are tokens (B, h*w, p*p*c): the (h, w) token grid, each token a p x p patch of c-channel
    latent pixels ordered (p, q, c) (umm.vision.patchify). Blocks are block x block latent pixels.
    """

    grid: tuple[int, int]  # (h, w) token grid
    patch: int  # latent patch size p
    channels: int  # latent channels c
    block: int  # K, latent pixels per block side

    def __post_init__(self):
        h, w = self.grid
        if self.block < 1 or (h * self.patch) % self.block or (w * self.patch) % self.block:
            raise ValueError(f"noise block {self.block} must be >= 1 and divide the latent grid "
                             f"{h * self.patch}x{w * self.patch}")

    def _pixels(self, x: Tensor) -> Tensor:
        """(B, h*w, p*p*c) -> (B, h*p, w*p, c)."""
        (h, w), p, c = self.grid, self.patch, self.channels
        if x.dim() != 3 or x.shape[1:] != (h * w, p * p * c):
            raise ValueError(f"latents must have shape (B, {h * w}, {p * p * c}), got {tuple(x.shape)}")
        return x.reshape(-1, h, w, p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, h * p, w * p, c)

    def means(self, x: Tensor) -> Tensor:
        """Block means (B, H/K, W/K, c) of latents x."""
        px, k = self._pixels(x), self.block
        b, hh, ww, c = px.shape
        return px.reshape(b, hh // k, k, ww // k, k, c).mean(dim=(2, 4))

    def expand(self, m: Tensor) -> Tensor:
        """Block values (B, H/K, W/K, c) -> block-constant latents (B, h*w, p*p*c)."""
        (h, w), p, c, k = self.grid, self.patch, self.channels, self.block
        b = m.shape[0]
        px = m[:, :, None, :, None, :].expand(b, h * p // k, k, w * p // k, k, c).reshape(b, h, p, w, p, c)
        return px.permute(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * c)

    def project(self, x: Tensor) -> Tensor:
        """P x: every block replaced by its mean."""
        return self.expand(self.means(x))

    @staticmethod
    def block_std(std: Tensor) -> Tensor:
        """A std shaped for latents (0-d or (B, 1, 1)) reshaped to broadcast over block means."""
        return std if std.dim() == 0 else std.reshape(std.shape[0], 1, 1, 1)


def _explored(basis: NoiseBasis | None, *latents: Tensor) -> tuple[Tensor, ...]:
    """The coordinates the noise explores: the latents themselves, or their block means."""
    return latents if basis is None else tuple(basis.means(x) for x in latents)


def _explored_std(basis: NoiseBasis | None, std: Tensor) -> Tensor:
    return std if basis is None else basis.block_std(std)


# --------------------------------------------------------------------------- one step

SIGMA_AT_ONE = ("flow_grpo", "capped")


def sde_sigma(t: TimeLike, *, noise_level: float, t_cap: float, at_one: str = "flow_grpo") -> Tensor:
    """Diffusion coefficient sigma_t = noise_level * sqrt(t / (1 - t)); returns fp32 with t's shape (and device).

    sigma diverges at t = 1 (the first sampling step); `t_cap` is the next-largest timestep of the
    schedule below 1 (`t_cap_of(timesteps)`), and `at_one` says how it is used there:

        "flow_grpo": noise_level * sqrt(t / (1 - min(t, t_cap)))   only the denominator is capped, as in
                     Flow-GRPO's released `sde_step_with_logprob` (its `sigma_max` = sigmas[1]); at
                     t = 1 this is 1 / sqrt(t_cap) times "capped": x1.011 at 16 steps / shift 3,
                     x1.054 at 10 steps / shift 1. The default: published settings mean the same here.
        "capped":    noise_level * sqrt(t_c / (1 - t_c)), t_c = min(t, t_cap)   sigma_1 = sigma_{t_cap}

    Both agree for every t <= t_cap, i.e. on every step but the first.
    """
    if not 0.0 < t_cap < 1.0:
        raise ValueError(f"t_cap must lie in (0, 1), got {t_cap!r}")
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level!r}")
    if at_one not in SIGMA_AT_ONE:
        raise ValueError(f"at_one must be one of {SIGMA_AT_ONE}, got {at_one!r}")
    t = t.float() if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.float32)  # a tensor keeps its device
    t_c = t.clamp(max=t_cap)
    return noise_level * torch.sqrt((t if at_one == "flow_grpo" else t_c) / (1.0 - t_c))


def sde_mean_std(
    x: Tensor, v: Tensor, t: TimeLike, t_next: TimeLike, *, noise_level: float, t_cap: float,
    basis: NoiseBasis | None = None, at_one: str = "flow_grpo",
) -> tuple[Tensor, Tensor]:
    """Mean and std of the Gaussian SDE transition x -> x_next (both fp32, broadcastable to x).

        dt   = t_next - t  (< 0)
        mean = x + [v + sigma_t^2 / (2 t) * (x + (1 - t) * v)] * dt
        std  = sigma_t * sqrt(-dt)

    t and t_next may be python floats, 0-d tensors or per-sample (B,) tensors. Inputs are cast to
    fp32: the PPO clip range is ~1e-5 and the log-prob is a mean over ~10^4 elements, so ratios
    differ from 1 by ~1e-6; bf16 rounding of x, v or the mean would swamp that signal.
    With a `basis`, the score correction is projected and std is that of a block mean (std / K).
    `t_cap`, `at_one`: sigma at t = 1 (`sde_sigma`).
    """
    if x.shape != v.shape:
        raise ValueError(f"v must have x's shape {tuple(x.shape)}, got {tuple(v.shape)}")
    x, v = x.float(), v.float()
    t_b, t_next_b = _as_time(t, x), _as_time(t_next, x)
    sigma = sde_sigma(t_b, noise_level=noise_level, t_cap=t_cap, at_one=at_one)
    dt = t_next_b - t_b
    score_term = x + (1.0 - t_b) * v
    if basis is not None:
        score_term = basis.project(score_term)
    mean = x + (v + sigma**2 / (2.0 * t_b) * score_term) * dt
    std = sigma * torch.sqrt(-dt)
    return mean, std if basis is None else std / basis.block


def gaussian_logp(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Log-density of x_next under N(mean, std^2), MEAN over all non-batch elements -> (B,) fp32.

        logp_b = mean_i [ -(x_i - mu_i)^2 / (2 std^2) - log std - log sqrt(2 pi) ]

    Averaging (not summing) over the ~10^4 latent elements keeps logp O(1) but shrinks
    logp - logp_old by the same factor: that is why the image PPO clip range is tiny (1e-4..1e-5)
    rather than the usual 0.2. Equals Normal(mean, std).log_prob(x_next).mean(non-batch dims).
    """
    x_next, mean, std = x_next.float(), mean.float(), std.float()
    logp = -((x_next - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    logp = logp.expand(x_next.shape)
    return logp.mean(dim=tuple(range(1, x_next.dim())))


def euler_step(x: Tensor, v: Tensor, t: TimeLike, t_next: TimeLike) -> Tensor:
    """Deterministic ODE step x_next = x + v * (t_next - t), in fp32."""
    x = x.float()
    return x + v.float() * (_as_time(t_next, x) - _as_time(t, x))


@dataclass(frozen=True, kw_only=True)
class SDEStep:
    """One sampled transition. Tensors are fp32."""

    x_next: Tensor  # (B, ...) the next state
    mean: Tensor  # (B, ...) transition mean
    std: Tensor  # broadcastable to x: 0-d or (B, 1, ..., 1); a block mean's std with a basis
    logp: Tensor  # (B,) mean-over-elements log-density of x_next; zeros for an ODE step


def sde_step(
    x: Tensor,
    v: Tensor,
    t: TimeLike,
    t_next: TimeLike,
    *,
    noise_level: float,
    t_cap: float,
    eps: Tensor | None = None,
    generator: torch.Generator | None = None,
    basis: NoiseBasis | None = None,
    at_one: str = "flow_grpo",
) -> SDEStep:
    """Sample x_next = mean + std * eps from the SDE transition and score it (see `sde_mean_std`).

    eps: standard-normal noise of x's shape (with a basis: of the block grid's shape); drawn with
    `generator` when None. With a basis the log-prob is that of the block means.
    noise_level == 0 is the Euler ODE step exactly (x_next = x + v * dt, bitwise, in fp32) with
    std = 0 and logp = zeros: ODE steps are never trained, so they carry no log-prob.
    """
    if noise_level == 0:
        x_next = euler_step(x, v, t, t_next)
        zeros = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        return SDEStep(x_next=x_next, mean=x_next, std=torch.zeros((), dtype=torch.float32, device=x.device),
                       logp=zeros)
    mean, std = sde_mean_std(x, v, t, t_next, noise_level=noise_level, t_cap=t_cap, basis=basis, at_one=at_one)
    shape = x.shape if basis is None else basis.means(x).shape
    if eps is None:
        eps = torch.randn(shape, generator=generator, dtype=torch.float32, device=x.device)
    elif eps.shape != shape:
        raise ValueError(f"eps must have shape {tuple(shape)}, got {tuple(eps.shape)}")
    x_next = mean + std * (eps.float() if basis is None else basis.expand(eps.float()))
    logp = gaussian_logp(*_explored(basis, x_next, mean), _explored_std(basis, std))
    return SDEStep(x_next=x_next, mean=mean, std=std, logp=logp)


def step_logp(
    x: Tensor, v: Tensor, t: TimeLike, t_next: TimeLike, x_next: Tensor, *, noise_level: float, t_cap: float,
    basis: NoiseBasis | None = None, at_one: str = "flow_grpo",
) -> tuple[Tensor, Tensor, Tensor]:
    """Score a stored transition x -> x_next under velocity v: (logp (B,), mean, std).

    Same arithmetic as `sde_step`, so with the rollout's v the result equals the stored logp.
    Gradients flow through v (the learner's model output). Requires noise_level > 0.
    """
    if not noise_level > 0:
        raise ValueError(f"noise_level must be > 0 to score a transition, got {noise_level!r}")
    mean, std = sde_mean_std(x, v, t, t_next, noise_level=noise_level, t_cap=t_cap, basis=basis, at_one=at_one)
    return gaussian_logp(*_explored(basis, x_next, mean), _explored_std(basis, std)), mean, std


KL_SCALES = ("flow_grpo", "exact")


def kl_to_reference(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per element, MEAN over non-batch elements -> (B,).

        kl_b = mean_i (mu_theta,i - mu_ref,i)^2 / (2 std^2)

    Same std on both sides (it depends only on t), so only the means differ. Averaged like
    `gaussian_logp`, so it is on the same per-element scale as the log-prob. With the transition's
    std = sigma_t * sqrt(-dt) this is the exact KL of the two transitions; Flow-GRPO's code divides
    by 2 sigma_t^2 instead, i.e. its KL is (-dt) times this one (`transition_kl`).
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(f"mean_ref must have mean's shape {tuple(mean.shape)}, got {tuple(mean_ref.shape)}")
    kl = ((mean.float() - mean_ref.float()) ** 2 / (2.0 * std.float() ** 2)).expand(mean.shape)
    return kl.mean(dim=tuple(range(1, mean.dim())))


def transition_kl(mean: Tensor, mean_ref: Tensor, std: Tensor, dt: TimeLike, *, scale: str = "flow_grpo") -> Tensor:
    """The per-step KL penalty to the reference transition -> (B,), on one of two scales:

        "exact":     kl_to_reference(mean, mean_ref, std)           ||dmu||^2 / (2 sigma_t^2 (-dt))
        "flow_grpo": (-dt) * kl_to_reference(mean, mean_ref, std)   ||dmu||^2 / (2 sigma_t^2), what
                     Flow-GRPO's training code computes (it divides by its std_dev_t = sigma_t, not by
                     the transition's std): a `kl_weight` from a Flow-GRPO config means the same here
                     only on this scale. The exact KL is 1 / (-dt) times larger (10-50x at 10-16 steps).

    dt = t_next - t < 0: a float, a 0-d tensor or per-sample (B,).
    """
    if scale not in KL_SCALES:
        raise ValueError(f"scale must be one of {KL_SCALES}, got {scale!r}")
    kl = kl_to_reference(mean, mean_ref, std)
    if scale == "exact":
        return kl
    dt = torch.as_tensor(dt, dtype=torch.float32, device=kl.device)
    if not bool((dt < 0).all()):
        raise ValueError(f"dt = t_next - t must be < 0, got {dt!r}")
    return -dt * kl


# --------------------------------------------------------------------------- whole path

def check_window(num_steps: int, *, window_size: int, start_range: tuple[int, int] | list[int]) -> None:
    """ValueError unless every window `sde_window` can draw lies inside [0, num_steps - 2].

    The window never contains the last step (num_steps - 1): its end start + K - 1 must be
    <= num_steps - 2 for every start in the range.
    """
    if len(start_range) != 2:
        raise ValueError(f"start_range must be (lo, hi), got {start_range!r}")
    lo, hi = start_range
    if not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2, got {num_steps!r}")
    if not isinstance(window_size, int) or window_size < 1:
        raise ValueError(f"window_size must be an int >= 1, got {window_size!r}")
    if not 0 <= lo <= hi:
        raise ValueError(f"start_range must satisfy 0 <= lo <= hi, got {start_range!r}")
    if hi + window_size - 1 > num_steps - 2:
        raise ValueError(
            f"start_range {start_range!r} with window_size {window_size} reaches step "
            f"{hi + window_size - 1}; the window must end before the last step {num_steps - 1}"
        )


def sde_window(
    num_steps: int, *, window_size: int, start_range: tuple[int, int], generator: torch.Generator | None = None
) -> range:
    """The K = window_size consecutive SDE (trained) steps, start ~ Uniform{start_range[0]..start_range[1]}.

    `check_window` must hold (the window ends before the last step). RT2I: 16 steps, K = 10,
    start in (0, 1); SRR: 40 steps, K = 5, start in (0, 14).
    """
    check_window(num_steps, window_size=window_size, start_range=start_range)
    lo, hi = start_range
    start = int(torch.randint(lo, hi + 1, (1,), generator=generator))
    return range(start, start + window_size)


@dataclass(frozen=True, kw_only=True)
class FlowTrajectory:
    """A sampled denoising path. All tensors fp32, on x_init's device."""

    latents: Tensor  # (N + 1, B, ...) states x_0 (noise, t = 1) .. x_N (t = 0)
    timesteps: Tensor  # (N + 1,) t_0 = 1 .. t_N = 0
    sde_steps: list[int]  # K step indices i (transition latents[i] -> latents[i + 1]) that are SDE
    logp: Tensor  # (K, B) mean-over-elements log-prob of each SDE transition, in sde_steps order
    noise_level: float  # the `a` in sigma_t
    basis: NoiseBasis | None = None  # block-constant exploration noise (None: every element, Flow-GRPO)
    sigma_at_one: str = "flow_grpo"  # sigma at t = 1 (sde_sigma's `at_one`)

    @property
    def t_cap(self) -> float:
        return t_cap_of(self.timesteps)


def sample_flow(
    velocity_fn: VelocityFn,
    x_init: Tensor,
    *,
    timesteps: Tensor,
    sde_steps: set[int] | range | list[int],
    noise_level: float,
    generator: torch.Generator | None = None,
    basis: NoiseBasis | None = None,
    sigma_at_one: str = "flow_grpo",
) -> FlowTrajectory:
    """Denoise x_init along `timesteps`: SDE steps (sampled and scored) in sde_steps, Euler elsewhere.

    velocity_fn(x, t, step_index) -> v of x's shape, with t a 0-d fp32 tensor; guidance (CFG) is
    the caller's business and must be the same function the learner uses. Runs under no_grad.
    sigma_at_one: the noise at t = 1 (`sde_sigma`); stored in the trajectory for the learner.
    """
    num_steps = timesteps.numel() - 1
    if timesteps.dim() != 1 or num_steps < 1:
        raise ValueError(f"timesteps must be 1-D with >= 2 values, got shape {tuple(timesteps.shape)}")
    steps = sorted(set(sde_steps))
    if any(not 0 <= i < num_steps for i in steps):
        raise ValueError(f"sde_steps must lie in [0, {num_steps - 1}], got {steps}")
    timesteps = timesteps.to(device=x_init.device, dtype=torch.float32)
    t_cap = t_cap_of(timesteps) if steps and noise_level > 0 else 0.5
    x = x_init.float()
    latents, logps = [x], []
    with torch.no_grad():
        for i in range(num_steps):
            t, t_next = timesteps[i], timesteps[i + 1]
            v = velocity_fn(x, t, i)
            if v.shape != x.shape:
                raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(x.shape)}")
            if i in steps:
                step = sde_step(x, v, t, t_next, noise_level=noise_level, t_cap=t_cap, generator=generator,
                                basis=basis, at_one=sigma_at_one)
                x = step.x_next
                logps.append(step.logp)
            else:
                x = euler_step(x, v, t, t_next)
            latents.append(x)
    logp = torch.stack(logps) if logps else torch.zeros(0, x.shape[0], dtype=torch.float32, device=x.device)
    return FlowTrajectory(
        latents=torch.stack(latents), timesteps=timesteps, sde_steps=steps, logp=logp, noise_level=noise_level,
        basis=basis, sigma_at_one=sigma_at_one,
    )


@dataclass(frozen=True, kw_only=True)
class StepScores:
    """Learner-side scores of stored SDE transitions, in the order of the steps asked for."""

    logp: Tensor  # (K, B) mean-over-elements log-prob under the current velocity (differentiable)
    kl: Tensor | None  # (K, B) KL to the reference transition (transition_kl), if a reference was given


def recompute_steps(
    velocity_fn: VelocityFn,
    traj: FlowTrajectory,
    *,
    ref_velocity_fn: VelocityFn | None = None,
    steps: list[int] | None = None,
    kl_scale: str = "flow_grpo",
) -> StepScores:
    """Score the stored SDE transitions under velocity_fn (with grad, for the learner).

    steps defaults to traj.sde_steps and must be a subset of it (ODE steps carry no log-prob).
    With the rollout's velocity_fn and weights, logp equals traj.logp (ratio 1 on-policy).
    ref_velocity_fn (e.g. the base weights, LoRA off; evaluated without grad) adds the per-step
    KL to the reference's transition on `kl_scale` ("flow_grpo" or "exact", see `transition_kl`).
    """
    steps = list(traj.sde_steps) if steps is None else list(steps)
    if not set(steps) <= set(traj.sde_steps):
        raise ValueError(f"steps must be a subset of traj.sde_steps {traj.sde_steps}, got {steps}")
    if not traj.noise_level > 0:
        raise ValueError(f"traj.noise_level must be > 0 to score transitions, got {traj.noise_level!r}")
    t_cap, logps, kls = traj.t_cap, [], []
    for i in steps:
        x, t, t_next = traj.latents[i], traj.timesteps[i], traj.timesteps[i + 1]
        logp, mean, std = step_logp(
            x, velocity_fn(x, t, i), t, t_next, traj.latents[i + 1], noise_level=traj.noise_level, t_cap=t_cap,
            basis=traj.basis, at_one=traj.sigma_at_one,
        )
        logps.append(logp)
        if ref_velocity_fn is not None:
            with torch.no_grad():
                mean_ref, _ = sde_mean_std(x, ref_velocity_fn(x, t, i), t, t_next, noise_level=traj.noise_level,
                                           t_cap=t_cap, basis=traj.basis, at_one=traj.sigma_at_one)
            # with a basis the two Gaussians live on the block means
            kls.append(transition_kl(*_explored(traj.basis, mean, mean_ref), _explored_std(traj.basis, std),
                                     t_next - t, scale=kl_scale))
    empty = torch.zeros(0, traj.latents.shape[1], dtype=torch.float32, device=traj.latents.device)
    return StepScores(logp=torch.stack(logps) if logps else empty,
                      kl=(torch.stack(kls) if kls else empty) if ref_velocity_fn is not None else None)


def recompute_logp(velocity_fn: VelocityFn, traj: FlowTrajectory, *, steps: list[int] | None = None) -> Tensor:
    """Log-probs (K, B) of the stored SDE transitions under velocity_fn (see `recompute_steps`)."""
    return recompute_steps(velocity_fn, traj, steps=steps).logp
