"""Self-reflective refinement (SRR), the method's second task, as work units over typed records.

    stage 1   draw_candidates: K deterministic (ODE) images of one prompt from the current policy (plans
              at the evaluation temperature). The driver scores them and picks the initial image: the
              lowest-reward one, or one drawn with p ∝ softmax(-r / τ) (grpo.refine.pick_initial)
    stage 2   reflect_group: G rollouts from (the initial image, a reflection prompt that says it is
              wrong, the request): a sampled critique and edit instruction in the think block, then the
              refined image drawn as an edit of the initial one (image CFG on), with its SDE path and
              log-probs (grpo.policy.rollout: the same path as RT2I)
    rules     grpo.refine: false-positive rectification per group, the skip rule per batch (the driver)

One advantage per trajectory, shared by the critique tokens and the trained image steps; the text term
counts like one image step (the payload's task "srr" sets LossConfig.mode). No Ray, no DeepSpeed here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from grpo.groups import EvalRequest, GroupMeta, GroupPayload, PolicySettings, draw_heldout, draw_rollout
from grpo.policy import FlowConfig, ThinkConfig
from grpo.refine import PICKS
from umm.config import ConfigError
from umm.guidance import CFGConfig
from umm.model import UnifiedModel
from umm.prompting import Prompter
from worlds.base import Judge
from worlds.records import PromptRecord


def _srr_flow() -> FlowConfig:
    # the method's SRR sampler (code): 40 steps, an SDE window of 5 starting within the first 15, edit CFG
    return FlowConfig(num_steps=40, shift=3.0, window_size=5, window_start=(0, 14), noise_level=0.7,
                      cfg=CFGConfig(text_scale=4.0, image_scale=2.0, renorm_type="text_channel"))


@dataclass(kw_only=True)
class SRRConfig:
    """The SRR episode (method defaults; the shapes config scales the sampler down)."""
    candidates: int = 4              # K stage-1 ODE images per prompt
    pick: str = "lowest"             # the initial image: "lowest" reward, or "softmax" p ∝ exp(-r / pick_temperature)
    pick_temperature: float = 0.1
    candidate_steps: int = 40        # ODE steps of the stage-1 images
    think: ThinkConfig = field(default_factory=ThinkConfig)   # sampling of the critique + edit instruction
    flow: FlowConfig = field(default_factory=_srr_flow)       # the refined image: SDE window, edit CFG (image on)

    def validate(self, prefix: str = "srr") -> "SRRConfig":
        if self.candidates < 1:
            raise ConfigError(f"{prefix}.candidates: must be >= 1, got {self.candidates}")
        if self.pick not in PICKS:
            raise ConfigError(f"{prefix}.pick={self.pick!r}: not one of {PICKS}")
        if not self.pick_temperature > 0:
            raise ConfigError(f"{prefix}.pick_temperature: must be > 0, got {self.pick_temperature}")
        if self.candidate_steps < 1:
            raise ConfigError(f"{prefix}.candidate_steps: must be >= 1, got {self.candidate_steps}")
        if not self.think.enabled:
            raise ConfigError(f"{prefix}.think.enabled: SRR writes its critique in the think block; it must be on")
        self.think.validate(f"{prefix}.think")
        self.flow.validate(f"{prefix}.flow")
        if not self.flow.cfg.uses_image:
            raise ConfigError(f"{prefix}.flow.cfg.image_scale: the refinement is an edit of the initial image; "
                              f"image guidance must be on (> 1), got {self.flow.cfg.image_scale}")
        return self


@dataclass(frozen=True, kw_only=True)
class CandidatesRequest:
    """Stage 1: `count` ODE images of one prompt (their plans at the evaluation temperature)."""
    index: int
    prompt: PromptRecord
    count: int
    seed: int
    policy_version: int


@dataclass(frozen=True, kw_only=True)
class ReflectRequest:
    """Stage 2: G reflect-and-edit rollouts from the initial image of `prompt` (the image travels
    beside the request: an object-store ref in the pipeline, resolved by Ray in the actor)."""
    index: int
    prompt: PromptRecord
    group_size: int
    seed: int
    policy_version: int


@torch.no_grad()
def draw_candidates(model: UnifiedModel, prompter: Prompter, req: CandidatesRequest, settings: PolicySettings,
                    srr: SRRConfig, *, judge: Judge | None = None) -> tuple[GroupMeta, np.ndarray]:
    """Stage 1 through the held-out drawing path (ODE, evaluation plans), K copies of the prompt: each
    row its own noise, so K different images (deterministic given the seed and the weights)."""
    cand = replace(settings, eval_flow=replace(settings.eval_flow, num_steps=srr.candidate_steps))
    meta, images = draw_heldout(model, prompter, EvalRequest(index=req.index, prompts=(req.prompt,) * req.count,
                                                             seed=req.seed, policy_version=req.policy_version),
                                cand, judge=judge)
    return replace(meta, prompt_id=req.prompt.id), images


@torch.no_grad()
def reflect_group(model: UnifiedModel, prompter: Prompter, req: ReflectRequest, initial: np.ndarray,
                  settings: PolicySettings, srr: SRRConfig, *, judge: Judge | None = None
                  ) -> tuple[GroupMeta, GroupPayload, np.ndarray]:
    """Stage 2: G (critique + instruction, refined image) trajectories with their log-probs; `initial`
    is the (H, W, 3) uint8 image the model is told is wrong."""
    t0 = time.perf_counter()
    dps = [prompter.reflect(initial, req.prompt.text) for _ in range(req.group_size)]
    ro, images, plans, judged = draw_rollout(model, prompter, judge, [req.prompt] * req.group_size, dps, seed=req.seed,
                                      think=srr.think, flow=srr.flow, canvas_size=settings.canvas_size,
                                      policy_version=req.policy_version)
    meta = GroupMeta(index=req.index, prompt_id=req.prompt.id, policy_version=req.policy_version, plans=plans,
                     judged=judged, seconds=time.perf_counter() - t0)
    payload = GroupPayload(index=req.index, draw_prompts=dps, rollout=ro, guidance=srr.flow.cfg, think=srr.think,
                           task="srr")
    return meta, payload, images


@dataclass(kw_only=True)
class SelfRefineConfig:
    """Inference-time SRR (driver.refine): refine while the model's own DVReward is below a threshold."""
    threshold: float = 0.9           # an image whose own reward is below this is refined
    rounds: int = 1                  # at most this many refinements of one image
    batch_size: int = 16             # images drawn / refined per batch

    def validate(self, prefix: str = "refine") -> "SelfRefineConfig":
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"{prefix}.threshold: must be in [0, 1], got {self.threshold}")
        if self.rounds < 0:
            raise ConfigError(f"{prefix}.rounds: must be >= 0, got {self.rounds}")
        if self.batch_size < 1:
            raise ConfigError(f"{prefix}.batch_size: must be >= 1, got {self.batch_size}")
        return self


@torch.no_grad()
def draw_refinements(model: UnifiedModel, prompter: Prompter, req: EvalRequest, images: np.ndarray,
                     settings: PolicySettings, srr: SRRConfig) -> tuple[GroupMeta, np.ndarray]:
    """Inference-time stage 2, one refinement per (prompt, image) of the batch, deterministic: the critique
    and instruction at the evaluation temperature (top-p 1), the edit with the ODE (noise level 0) at the
    evaluation's step count, SRR's guidance (image CFG on)."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    prompts = list(req.prompts)
    if len(images) != len(prompts):
        raise ValueError(f"refinement batch {req.index}: {len(images)} images for {len(prompts)} prompts")
    dps = [prompter.reflect(img, p.text) for p, img in zip(prompts, images)]
    think = replace(srr.think, temperature=settings.eval_think.temperature if settings.eval_think else 0.0, top_p=1.0)
    flow = replace(srr.flow, num_steps=settings.eval_flow.num_steps, noise_level=0.0, shared_start=False)
    _, out, plans, _ = draw_rollout(model, prompter, None, prompts, dps, seed=req.seed, think=think, flow=flow,
                                    canvas_size=settings.canvas_size, policy_version=req.policy_version)
    model.train(was_training)
    meta = GroupMeta(index=req.index, prompt_id=",".join(p.id for p in prompts), policy_version=req.policy_version,
                     plans=plans, judged=None, seconds=time.perf_counter() - t0)
    return meta, out
