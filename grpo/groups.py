"""The trainer's units of work as plain functions over typed records: sample a group, refine, draw
held-out images, advantages of a batch, the loss over groups.

The Ray actors (actors.rollout, actors.refine, actors.policy_learner) are thin shells over these and
the one-process baseline (driver.sync) calls them directly. No Ray, no DeepSpeed here.

Records that cross actor boundaries:
  GroupRequest   driver -> rollout actor   which prompt, its seed, the policy version expected
  RefineRequest  driver -> refine actor    a source image, an instruction, the prompt it must satisfy
  EvalRequest    driver -> rollout actor   a batch of held-out prompts, one image each, a fixed seed
  GroupMeta      rollout -> driver         small: index, version, plans, judge verdicts (if any)
  GroupPayload   rollout -> learner        the trajectories (tokens, latents, log-probs): object store only
  images         rollout -> verifier       uint8 (H, W, 3) each: object store only
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from grpo.advantages import compute_advantages
from grpo.loading import PolicyConfig
from grpo.policy import FlowConfig, LossConfig, Rollout, ThinkConfig, grpo_loss, rollout
from umm.context import DrawPrompt
from umm.guidance import CFGConfig
from umm.model import UnifiedModel
from umm.prompting import Prompter
from worlds.base import Judge
from worlds.records import PromptRecord


@dataclass(frozen=True, kw_only=True)
class GroupRequest:
    """Sample G trajectories for one prompt with the policy at `policy_version`."""
    index: int                       # position in the run's prompt stream (batches are formed in this order)
    prompt: PromptRecord
    group_size: int
    seed: int                        # the group's sampling seed: same seed, same weights -> same group
    policy_version: int


@dataclass(frozen=True, kw_only=True)
class RefineRequest:
    """Redraw an image as an edit, G times: the source image and an instruction in, G edits out."""
    index: int
    prompt: PromptRecord             # the prompt the source image was drawn for (what the reward checks)
    source: np.ndarray               # (H, W, 3) uint8: the image to refine
    instruction: str                 # the edit instruction (SRR: the model's own, after its critique)
    group_size: int
    seed: int
    policy_version: int


@dataclass(frozen=True, kw_only=True)
class EvalRequest:
    """One held-out batch: image `image_index` of each prompt, drawn deterministically from `seed`."""
    index: int                       # the batch's position in the evaluation (results are pooled in this order)
    prompts: tuple[PromptRecord, ...]
    seed: int
    policy_version: int


@dataclass(frozen=True, kw_only=True)
class GroupMeta:
    index: int
    prompt_id: str
    policy_version: int
    plans: tuple[str, ...]
    judged: tuple[bool, ...] | None  # the world's strict verdict per image (reported, not the reward); None: no judge
    seconds: float


@dataclass(kw_only=True)
class GroupPayload:
    """What the learner needs to recompute a group's log-probs (fp32 tensors): the trajectories and the
    sampling settings they were drawn with (the learner must score with the same ones: ratio 1)."""
    index: int
    draw_prompts: list[DrawPrompt]   # G copies of the prompt's context
    rollout: Rollout
    think: ThinkConfig | None        # how the text was sampled (its temperature); None: no text written
    guidance: CFGConfig | None = None  # the CFG the group was drawn with when not the run's (edits, SRR)
    task: str = "rt2i"               # "rt2i" | "srr": the text term's weight (grpo.losses.text_weight_for)


@dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """The sampler/loss settings shared by rollout and learner (built once from the config)."""
    think: ThinkConfig | None        # None: draw without a plan
    flow: FlowConfig
    loss: LossConfig
    canvas_size: int
    edit_guidance: CFGConfig         # CFG of edits (refine workers): text + source-image guidance
    eval_think: ThinkConfig | None   # held-out drawing: plan at the evaluation temperature
    eval_flow: FlowConfig            # held-out drawing: deterministic ODE (noise_level 0)


def policy_settings(policy: PolicyConfig, loss: LossConfig, *, eval_steps: int, eval_cfg_scale: float,
                    eval_think_temperature: float, eval_think: bool) -> PolicySettings:
    think = policy.think if policy.think.enabled else None
    eval_think_cfg = (replace(policy.think, temperature=eval_think_temperature, top_p=1.0)
                      if think is not None and eval_think else None)
    eval_flow = replace(policy.flow, num_steps=eval_steps, noise_level=0.0, shared_start=False,
                        cfg=replace(policy.flow.cfg, text_scale=eval_cfg_scale))
    return PolicySettings(think=think, flow=policy.flow, loss=loss, canvas_size=policy.canvas_size,
                          edit_guidance=policy.edit_cfg, eval_think=eval_think_cfg, eval_flow=eval_flow)


def to_uint8(model: UnifiedModel, latents: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """Final latent tokens (B, n, D) -> images (B, H, W, 3) uint8."""
    px = model.tokens_to_image(latents.float(), hw)
    return ((px.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _plans(prompter: Prompter, ro: Rollout) -> tuple[str, ...]:
    return tuple(prompter.plan_text(row[mask]) for row, mask in zip(ro.think.tokens, ro.think.mask))


def draw_rollout(model: UnifiedModel, prompter: Prompter, judge: Judge | None, prompts: list[PromptRecord],
                 dps: list[DrawPrompt], *, seed: int, think: ThinkConfig | None, flow: FlowConfig, canvas_size: int,
                 policy_version: int) -> tuple[Rollout, np.ndarray, tuple[str, ...], tuple[bool, ...] | None]:
    """The one think-then-draw path of training, refinement, SRR and evaluation: roll out (grpo.policy),
    decode the plans, judge the images where the prompts' world has a judge."""
    hw = model.latent_grid(canvas_size, canvas_size)
    gen = torch.Generator().manual_seed(seed)
    ro = rollout(model, dps, hw=hw, think=think, flow=flow, generator=gen, policy_version=policy_version)
    images = to_uint8(model, ro.flow.latents[-1], hw)
    # judged where the images are (~3 ms each for shapes): a Ray task per group would start a fresh worker
    judged = None
    if judge is not None:
        judged = tuple(v for p, img in zip(prompts, images) for v in judge(img[None], p))
    return ro, images, _plans(prompter, ro), judged


@torch.no_grad()
def sample_group(model: UnifiedModel, prompter: Prompter, req: GroupRequest, settings: PolicySettings, *,
                 judge: Judge | None = None) -> tuple[GroupMeta, GroupPayload, np.ndarray]:
    """G think-then-draw trajectories of one prompt (deterministic given the seed and the weights)."""
    t0 = time.perf_counter()
    dps = [prompter.draw(req.prompt.text, think=settings.think is not None) for _ in range(req.group_size)]
    ro, images, plans, judged = draw_rollout(model, prompter, judge, [req.prompt] * req.group_size, dps, seed=req.seed,
                                      think=settings.think, flow=settings.flow, canvas_size=settings.canvas_size,
                                      policy_version=req.policy_version)
    meta = GroupMeta(index=req.index, prompt_id=req.prompt.id, policy_version=req.policy_version, plans=plans,
                     judged=judged, seconds=time.perf_counter() - t0)
    return meta, GroupPayload(index=req.index, draw_prompts=dps, rollout=ro, think=settings.think), images


@torch.no_grad()
def refine_group(model: UnifiedModel, prompter: Prompter, req: RefineRequest, settings: PolicySettings, *,
                 judge: Judge | None = None) -> tuple[GroupMeta, GroupPayload, np.ndarray]:
    """G edits of `req.source` following `req.instruction` (SDE path with log-probs, edit CFG: text and
    source image), deterministic given the seed and the weights."""
    t0 = time.perf_counter()
    src = np.asarray(req.source)
    if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3:
        raise ValueError(f"refine request {req.index}: source must be a uint8 (H, W, 3) array, got "
                         f"{src.dtype} {src.shape}")
    dps = [prompter.edit(src, req.instruction) for _ in range(req.group_size)]
    ro, images, plans, judged = draw_rollout(model, prompter, judge, [req.prompt] * req.group_size, dps, seed=req.seed,
                                      think=None, flow=replace(settings.flow, cfg=settings.edit_guidance),
                                      canvas_size=settings.canvas_size, policy_version=req.policy_version)
    meta = GroupMeta(index=req.index, prompt_id=req.prompt.id, policy_version=req.policy_version, plans=plans,
                     judged=judged, seconds=time.perf_counter() - t0)
    payload = GroupPayload(index=req.index, draw_prompts=dps, rollout=ro, think=None, guidance=settings.edit_guidance)
    return meta, payload, images


@torch.no_grad()
def draw_heldout(model: UnifiedModel, prompter: Prompter, req: EvalRequest, settings: PolicySettings, *,
                 judge: Judge | None = None) -> tuple[GroupMeta, np.ndarray]:
    """One image per held-out prompt of the batch: the plan at the evaluation temperature, then the
    deterministic ODE; the same path as training (`draw_rollout`), in eval mode."""
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    prompts = list(req.prompts)
    dps = [prompter.draw(p.text, think=settings.eval_think is not None) for p in prompts]
    _, images, plans, judged = draw_rollout(model, prompter, judge, prompts, dps, seed=req.seed, think=settings.eval_think,
                                     flow=settings.eval_flow, canvas_size=settings.canvas_size,
                                     policy_version=req.policy_version)
    model.train(was_training)
    meta = GroupMeta(index=req.index, prompt_id=",".join(p.id for p in prompts), policy_version=req.policy_version,
                     plans=plans, judged=judged, seconds=time.perf_counter() - t0)
    return meta, images


@dataclass(frozen=True, kw_only=True)
class BatchAdvantages:
    per_group: list[list[float]]     # in the batch's group order
    zero_variance: list[int]         # positions (in the batch) of groups with equal rewards


def batch_advantages(rewards: list[list[float]], *, std_scope: str) -> BatchAdvantages:
    """GRPO advantages for a batch of groups (one list of G rewards per group)."""
    flat = torch.tensor([r for g in rewards for r in g], dtype=torch.float64)
    ids = torch.tensor([i for i, g in enumerate(rewards) for _ in g])
    res = compute_advantages(flat, ids, std_scope=std_scope)
    out, k = [], 0
    for g in rewards:
        out.append([float(a) for a in res.adv[k:k + len(g)]])
        k += len(g)
    return BatchAdvantages(per_group=out, zero_variance=sorted(int(i) for i in res.zero_variance_groups))


@dataclass(frozen=True, kw_only=True)
class BatchStats:
    """What one optimizer step's loss saw, over the groups of one rank (`merge` combines ranks). On-policy
    the GRPO loss is ~0 by construction: the ratio ranges, clip fractions and KLs are what move."""
    groups: int
    loss: float
    image_loss: float
    text_loss: float
    image_ratio_min: float
    image_ratio_max: float
    text_ratio_min: float            # sequence-level ratios (NaN when no group wrote text)
    text_ratio_max: float
    image_clip_frac: float           # share of trained SDE steps whose ratio left the clip range
    text_clip_frac: float
    image_kl: float                  # per-step KL to the reference (0 unless a KL weight is set)
    text_kl: float
    think_entropy: float             # mean -log p of the sampled plan tokens (behaviour policy): an
                                     # estimate of the plan's entropy in nats/token (NaN: no text)

    @staticmethod
    def merge(parts: list["BatchStats"]) -> "BatchStats":
        """Ranks' stats as one step's: means weighted by groups, min of minima, max of maxima; the plan's
        entropy over the groups that wrote one."""
        n = sum(p.groups for p in parts)
        mean = lambda k, ps=parts: sum(getattr(p, k) * p.groups for p in ps) / sum(p.groups for p in ps)  # noqa: E731
        nanmin = lambda k: min((getattr(p, k) for p in parts if getattr(p, k) == getattr(p, k)),  # noqa: E731
                               default=float("nan"))
        nanmax = lambda k: max((getattr(p, k) for p in parts if getattr(p, k) == getattr(p, k)),  # noqa: E731
                               default=float("nan"))
        wrote = [p for p in parts if p.think_entropy == p.think_entropy]      # groups that wrote a plan
        return BatchStats(groups=n, think_entropy=mean("think_entropy", wrote) if wrote else float("nan"),
                          **{k: mean(k) for k in ("loss", "image_loss", "text_loss", "image_clip_frac",
                                                  "text_clip_frac", "image_kl", "text_kl")},
                          image_ratio_min=nanmin("image_ratio_min"), image_ratio_max=nanmax("image_ratio_max"),
                          text_ratio_min=nanmin("text_ratio_min"), text_ratio_max=nanmax("text_ratio_max"))


def groups_loss(model: UnifiedModel, payloads: list[GroupPayload], advantages: list[list[float]],
                settings: PolicySettings) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over groups of the GRPO loss (text + image, one advantage per trajectory), each group scored
    with the settings it was sampled with (its payload's think, guidance and task); the stats are a
    `BatchStats` as a dict (it crosses the learner's generic StepResult)."""
    if len(payloads) != len(advantages):
        raise ValueError(f"groups_loss: {len(payloads)} groups but {len(advantages)} advantage lists")
    total = torch.zeros(())
    parts = []
    for p, adv in zip(payloads, advantages):
        res = grpo_loss(model, p.draw_prompts, p.rollout, torch.tensor(adv, dtype=torch.float32),
                        think=p.think, cfg=p.guidance or settings.flow.cfg, loss=replace(settings.loss, mode=p.task))
        total = total + res.loss / len(payloads)
        think = p.rollout.think
        nan = float("nan")
        parts.append(BatchStats(
            groups=1, loss=float(res.loss.detach()), image_loss=res.image_loss, text_loss=res.text_loss,
            image_ratio_min=res.image.ratio_min, image_ratio_max=res.image.ratio_max,
            text_ratio_min=res.text.ratio_min if res.text else nan, text_ratio_max=res.text.ratio_max if res.text else nan,
            image_clip_frac=res.image.clipfrac, text_clip_frac=res.text.clipfrac if res.text else 0.0,
            image_kl=res.image.kl, text_kl=res.text.kl if res.text else 0.0,
            think_entropy=float(-think.logp[think.mask].mean()) if bool(think.mask.any()) else nan))
    stats = BatchStats.merge(parts)
    return total, asdict(stats)          # stats.loss: the mean of the groups' losses, i.e. float(total)
