"""The policy as GRPO sees it: think-then-draw rollouts with log-probs, and their recomputation.

One trajectory = the think text (tokens, log-probs) + the image's denoising path (SDE steps inside a
window, log-probs per step). The rollout and the learner build contexts and velocities with the
SAME functions below (`prompt_cache`, `draw_contexts`, `velocity_fn`), so on-policy the text and
image importance ratios equal 1 to float precision:

    rollout:  cache = prompt_cache(prompts)           think ~ generate_text(cache)      logp_old
              ctx   = draw_contexts(cache, think)     path  ~ sample_flow(velocity_fn(ctx))  logp_old
    learner:  cache, ctx as above (under grad)        logp  = token_logprobs / recompute_logp

This module imports the model (umm) and the pure math (grpo.sde, grpo.losses); no Ray, no DeepSpeed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from grpo.losses import (TEXT_LEVELS, TEXT_WEIGHT_MODES, LossStats, image_ppo_loss, text_grpo_loss, text_weight_for,
                         trajectory_loss)
from grpo.sde import (KL_SCALES, SIGMA_AT_ONE, FlowTrajectory, NoiseBasis, VelocityFn, check_window,
                      recompute_steps, sample_flow, sde_window, timestep_schedule)
from umm.context import DrawPrompt, GuidanceContexts, Text, encode_context, item_segments
from umm.generation import TextSample, generate_text, token_logprobs
from umm.lora import adapters_disabled
from umm.config import ConfigError
from umm.guidance import CFGConfig, guided_velocity
from umm.model import UnifiedModel
from umm.mot import KVCache


@dataclass(kw_only=True)
class ThinkConfig:
    """Sampling of the plan written before drawing (method defaults: T 1.0, top-p 0.8)."""
    enabled: bool = True             # reasoning text-to-image: write a plan, then draw (off: draw at once)
    max_new_tokens: int = 64         # the plan's budget, <|im_end|> included
    temperature: float = 1.0
    top_p: float = 0.8

    def validate(self, prefix: str = "think") -> "ThinkConfig":
        if self.max_new_tokens < 1:
            raise ConfigError(f"{prefix}.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"{prefix}.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{prefix}.top_p: must be in (0, 1], got {self.top_p}")
        return self


@dataclass(kw_only=True)
class FlowConfig:
    """The image sampler (RT2I defaults: 16 steps, shift 3, SDE window of 10 from step 0 or 1, a = 0.7)."""
    num_steps: int = 16
    shift: float = 3.0
    window_size: int = 10
    window_start: tuple[int, int] = (0, 1)
    noise_level: float = 0.7
    sigma_at_one: str = "flow_grpo"  # sigma at t = 1: Flow-GRPO's ("flow_grpo") or sigma(t_cap) ("capped"); grpo.sde
    noise_block: int = 1           # exploration noise shared by K x K latent blocks (1 = Flow-GRPO; grpo.sde)
    shared_start: bool = False     # every row starts from the same x_1 (a group: only SDE noise differs)
    cfg: CFGConfig = field(default_factory=CFGConfig)

    def validate(self, prefix: str = "flow") -> "FlowConfig":
        if self.num_steps < 1:
            raise ConfigError(f"{prefix}.num_steps: must be >= 1, got {self.num_steps}")
        if not self.shift > 0:
            raise ConfigError(f"{prefix}.shift: must be > 0, got {self.shift}")
        if not self.noise_level >= 0:
            raise ConfigError(f"{prefix}.noise_level: must be >= 0, got {self.noise_level}")
        if self.noise_block < 1:
            raise ConfigError(f"{prefix}.noise_block: must be >= 1, got {self.noise_block}")
        if self.sigma_at_one not in SIGMA_AT_ONE:
            raise ConfigError(f"{prefix}.sigma_at_one={self.sigma_at_one!r}: not one of {SIGMA_AT_ONE}")
        if self.noise_level > 0:   # the sampler's own check, before anything starts (the last step is never trained)
            try:
                check_window(self.num_steps, window_size=self.window_size, start_range=list(self.window_start))
            except ValueError as e:
                raise ConfigError(f"{prefix}.window_size={self.window_size} / {prefix}.window_start="
                                  f"{list(self.window_start)} / {prefix}.num_steps={self.num_steps}: {e}") from None
        self.cfg.validate(f"{prefix}.cfg")
        return self


@dataclass(kw_only=True)
class Rollout:
    """B think-then-draw trajectories, everything the learner needs to recompute them (fp32)."""
    think: TextSample            # tokens/mask (B, T); logp = behaviour log-probs (B, T)
    flow: FlowTrajectory         # latents (N+1, B, n_tokens, D); logp (K, B) of the SDE steps
    hw: tuple[int, int]          # latent token grid
    policy_version: int = 0


def think_items(think: TextSample, *, eos: int) -> list[Text | None]:
    """The written plan as context items: each row's tokens up to (not including) <|im_end|>.

    A row that wrote nothing but <|im_end|> contributes an empty segment (<|im_start|><|im_end|>, what
    it wrote), so every row of a group that wrote has a plan item and its context is built the same
    way (the learner's ZeRO-3 ranks must call the same modules in the same order); a row that wrote
    nothing at all (no think) contributes None."""
    items: list[Text | None] = []
    for toks, mask in zip(think.tokens, think.mask):
        if not bool(mask.any()):
            items.append(None)
            continue
        ids = [int(t) for t in toks[mask]]
        if ids[-1] == eos:
            ids = ids[:-1]
        items.append(Text(ids=tuple(ids)))
    return items


def prompt_cache(model: UnifiedModel, prompts: list[DrawPrompt]) -> KVCache:
    """The context the plan is written after: prefix (e.g. system prompt) + user text."""
    return encode_context(model, [[*p.prefix, p.text] for p in prompts])


def draw_contexts(model: UnifiedModel, prompts: list[DrawPrompt], cache: KVCache, thinks: list[Text | None],
                  *, cfg: CFGConfig) -> GuidanceContexts:
    """CFG contexts for drawing: full = cached prompt + plan; text-CFG = prefix; image-CFG (edits) = every
    text segment, the written plan (SRR: the critique and edit instruction) included, but no image."""
    rows = [item_segments(model, t) if t is not None else [] for t in thinks]
    if all(rows):
        full = model.encode(rows, cache=cache)
    elif not any(rows):
        full = cache
    else:  # mixed: rows without a plan are re-encoded from their prompt alone
        full = encode_context(model, [[*p.prefix, p.text, *([t] if t else [])] for p, t in zip(prompts, thinks)])
    no_text = encode_context(model, [p.no_text() for p in prompts]) if cfg.uses_text else None
    no_image = (encode_context(model, [[*p.no_image(), *([t] if t else [])] for p, t in zip(prompts, thinks)])
                if cfg.uses_image else None)
    return GuidanceContexts(full=full, no_text=no_text, no_image=no_image)


def velocity_fn(model: UnifiedModel, contexts: GuidanceContexts, *, hw: tuple[int, int],
                cfg: CFGConfig, every_branch: bool = False) -> VelocityFn:
    """The policy's guided velocity as grpo.sde expects it: (x, t, step_index) -> v. `every_branch`: run
    the CFG branches at steps outside the guidance interval too (the same values: inactive rows take the
    conditional velocity), so the number of model calls does not depend on which steps were trained
    (the learner's ZeRO-3 ranks must call the same modules in the same order)."""
    return lambda x, t, i: guided_velocity(model, x, t, hw=hw, contexts=contexts, cfg=cfg, every_branch=every_branch)


@torch.no_grad()
def rollout(model: UnifiedModel, prompts: list[DrawPrompt], *, hw: tuple[int, int], think: ThinkConfig | None,
            flow: FlowConfig, generator: torch.Generator | None = None, policy_version: int = 0) -> Rollout:
    """Write a plan (if `think` is given and enabled) and draw, for every prompt (repeat a prompt G times
    for a group). `flow.noise_level` 0 draws with the deterministic ODE (evaluation): no SDE window."""
    cache = prompt_cache(model, prompts)
    B, eos = len(prompts), model.cfg.tokens.eos
    if think is not None and think.enabled:
        sample = generate_text(model, cache, max_new_tokens=think.max_new_tokens, temperature=think.temperature,
                               top_p=think.top_p, generator=generator)
    else:
        empty = torch.zeros(B, 0)
        sample = TextSample(tokens=empty.long(), mask=empty.bool(), logp=empty, finished=torch.ones(B, dtype=torch.bool))
    contexts = draw_contexts(model, prompts, cache, think_items(sample, eos=eos), cfg=flow.cfg)
    timesteps = timestep_schedule(flow.num_steps, shift=flow.shift)
    window = (sde_window(flow.num_steps, window_size=flow.window_size, start_range=flow.window_start,
                         generator=generator) if flow.noise_level > 0 else [])
    rows = 1 if flow.shared_start else B
    noise = torch.randn(rows, hw[0] * hw[1], model.cfg.patch_latent_dim, generator=generator).repeat(B // rows, 1, 1)
    basis = (NoiseBasis(grid=hw, patch=model.cfg.latent_patch_size, channels=model.cfg.vae.z_channels,
                        block=flow.noise_block) if flow.noise_block > 1 else None)
    path = sample_flow(velocity_fn(model, contexts, hw=hw, cfg=flow.cfg), noise, timesteps=timesteps,
                       sde_steps=window, noise_level=flow.noise_level, generator=generator, basis=basis,
                       sigma_at_one=flow.sigma_at_one)
    return Rollout(think=sample, flow=path, hw=hw, policy_version=policy_version)


@dataclass(kw_only=True)
class Recomputed:
    """Current-weight scores of a rollout (differentiable) and, if asked, the reference's."""
    text_logp: Tensor              # (B, T)
    image_logp: Tensor             # (K, B)
    text_logp_ref: Tensor | None   # (B, T), base weights (LoRA off), no grad
    image_kl: Tensor | None        # (K, B), per-step KL to the base weights' transition


def recompute(model: UnifiedModel, prompts: list[DrawPrompt], ro: Rollout, *, think: ThinkConfig | None,
              cfg: CFGConfig, reference: bool = False, kl_scale: str = "flow_grpo") -> Recomputed:
    """Re-score a rollout with the current weights through the rollout's own code path.

    reference=True also scores it under the base weights (every LoRA adapter off), for the KL terms;
    the model must then carry LoRA, else the reference would be the policy itself. kl_scale: the image
    KL's scale ("flow_grpo" or "exact", grpo.sde.transition_kl)."""
    temperature = think.temperature if think is not None else 1.0
    has_text = ro.think.tokens.shape[1] > 0
    eos = model.cfg.tokens.eos

    def score(*, grad: bool):
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            cache = prompt_cache(model, prompts)
            text_logp = (token_logprobs(model, cache, ro.think.tokens, ro.think.mask, temperature=temperature)
                         if has_text else ro.think.logp)
            contexts = draw_contexts(model, prompts, cache, think_items(ro.think, eos=eos), cfg=cfg)
        return text_logp, velocity_fn(model, contexts, hw=ro.hw, cfg=cfg, every_branch=True)

    text_logp, policy_v = score(grad=True)
    text_ref, ref_v = None, None
    if reference:
        with adapters_disabled(model) as n_adapters:
            if n_adapters == 0:
                raise ValueError("a KL reference needs LoRA adapters (the reference is the base weights)")
            text_ref, ref_ctx_v = score(grad=False)

        def ref_v(x, t, i):
            with adapters_disabled(model):
                return ref_ctx_v(x, t, i)
    scores = recompute_steps(policy_v, ro.flow, ref_velocity_fn=ref_v, kl_scale=kl_scale)
    return Recomputed(text_logp=text_logp, image_logp=scores.logp,
                      text_logp_ref=text_ref.detach() if text_ref is not None else None, image_kl=scores.kl)


@dataclass(kw_only=True)
class LossConfig:
    """The GRPO objective's knobs (method defaults)."""
    image_clip: float = 1e-5
    text_clip_low: float = 0.2
    text_clip_high: float = 0.28
    text_level: str = "sequence"
    mode: str = "rt2i"             # text weight: "rt2i" = all trained image steps, "srr" = one step
    image_kl_weight: float = 0.0   # beta on the per-step KL to the reference (LoRA off), on image_kl_scale
    image_kl_scale: str = "flow_grpo"  # "flow_grpo": ||mu - mu_ref||^2 / (2 sigma_t^2) as Flow-GRPO's code,
                                       # "exact": the transitions' KL, 1 / (-dt) times that (grpo.sde.transition_kl)
    text_kl_weight: float = 0.0    # beta on the k3 estimator of KL(policy || reference)

    @property
    def needs_reference(self) -> bool:
        return self.image_kl_weight > 0 or self.text_kl_weight > 0

    def validate(self, prefix: str = "loss") -> "LossConfig":
        if not self.image_clip > 0:
            raise ConfigError(f"{prefix}.image_clip: must be > 0, got {self.image_clip}")
        if not (0 < self.text_clip_low < 1 and self.text_clip_high > 0):
            raise ConfigError(f"{prefix}.text_clip_low / text_clip_high: need 0 < low < 1 and high > 0, got "
                              f"{self.text_clip_low}, {self.text_clip_high}")
        for key, allowed in (("text_level", TEXT_LEVELS), ("mode", TEXT_WEIGHT_MODES), ("image_kl_scale", KL_SCALES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{prefix}.{key}={getattr(self, key)!r}: not one of {allowed}")
        if self.image_kl_weight < 0 or self.text_kl_weight < 0:
            raise ConfigError(f"{prefix}.image_kl_weight / text_kl_weight: must be >= 0")
        return self


@dataclass(kw_only=True)
class LossResult:
    loss: Tensor                   # scalar, differentiable
    image: LossStats
    text: LossStats | None
    image_loss: float
    text_loss: float


def grpo_loss(model: UnifiedModel, prompts: list[DrawPrompt], ro: Rollout, adv: Tensor, *,
              think: ThinkConfig | None, cfg: CFGConfig, loss: LossConfig) -> LossResult:
    """One shared advantage per trajectory on its text tokens and every trained image step."""
    r = recompute(model, prompts, ro, think=think, cfg=cfg, reference=loss.needs_reference,
                  kl_scale=loss.image_kl_scale)
    step_loss, img_stats = image_ppo_loss(r.image_logp.T, ro.flow.logp.T, adv, clip_eps=loss.image_clip,
                                          kl=r.image_kl.T if r.image_kl is not None else None,
                                          kl_weight=loss.image_kl_weight)
    K = step_loss.shape[1]
    step_mask = torch.ones_like(step_loss, dtype=torch.bool)
    text_loss, txt_stats = None, None
    if ro.think.tokens.shape[1]:
        text_loss, txt_stats = text_grpo_loss(r.text_logp, ro.think.logp, ro.think.mask, adv, level=loss.text_level,
                                              clip_low=loss.text_clip_low, clip_high=loss.text_clip_high,
                                              logp_ref=r.text_logp_ref, kl_weight=loss.text_kl_weight)
    total = trajectory_loss(image_step_loss=step_loss, image_step_mask=step_mask, text_loss=text_loss,
                            text_weight=text_weight_for(loss.mode, K))
    return LossResult(loss=total, image=img_stats, text=txt_stats,
                      image_loss=float(step_loss.detach().mean()),
                      text_loss=float(text_loss.detach().mean()) if text_loss is not None else 0.0)
