"""The pipeline's stages as plain functions: load the policy, sample a group, judge, advantages, loss.

Both trainer modes call exactly these: `driver.sync` one after another in one process, the Ray
pipeline from inside the actors (`actors.rollout`, `actors.learner`). No Ray, no DeepSpeed here.

Records that cross actor boundaries:
  GroupRequest   driver -> rollout actor   which prompt, its seed, the policy version expected
  GroupMeta      rollout -> driver         small: index, version, plans (moved by the driver)
  GroupPayload   rollout -> learner        the trajectories (tokens, latents, log-probs): object store only
  images         rollout -> verifier       uint8 (G, H, W, 3): object store only
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from driver.config import Config, EvalConfig, PolicyConfig, TrainerConfig
from grpo.advantages import compute_advantages
from grpo.policy import FlowConfig, LossConfig, Rollout, ThinkConfig, grpo_loss, rollout
from shapes.benchmark import is_held_out
from shapes.prompts import Prompt, generate
from umm.context import DrawPrompt
from umm.guidance import CFGConfig
from umm.model import UnifiedModel


@dataclass(frozen=True, kw_only=True)
class GroupRequest:
    """Sample G trajectories for one prompt with the policy at `policy_version`."""
    index: int                       # position in the run's prompt stream (batches are formed in this order)
    prompt: Prompt
    group_size: int
    seed: int                        # the group's sampling seed: same seed, same weights -> same group
    policy_version: int


@dataclass(frozen=True, kw_only=True)
class RefineRequest:
    """Redraw an image as an edit, G times: the source image and an instruction in, G edits out."""
    index: int
    prompt: Prompt                   # the prompt the source image was drawn for (what the reward checks)
    source: np.ndarray               # (H, W, 3) uint8: the image to refine
    instruction: str                 # the edit instruction (SRR: the model's own, after its critique)
    group_size: int
    seed: int
    policy_version: int


@dataclass(frozen=True, kw_only=True)
class GroupMeta:
    index: int
    prompt_id: str
    policy_version: int
    plans: tuple[str, ...]
    judged: tuple[bool, ...]         # the strict judge's verdict per image (reported, not the reward)
    seconds: float


@dataclass(kw_only=True)
class GroupPayload:
    """What the learner needs to recompute a group's log-probs (fp32 tensors)."""
    index: int
    draw_prompts: list[DrawPrompt]   # G copies of the prompt's context
    rollout: Rollout
    guidance: CFGConfig | None = None  # the CFG the group was drawn with when not the run's (edits)


@dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """The sampler/loss settings shared by rollout and learner (built once from the config)."""
    think: ThinkConfig | None
    flow: FlowConfig
    loss: LossConfig
    canvas_size: int
    edit_guidance: CFGConfig         # CFG of edits (refine workers): text + source-image guidance


def policy_settings(policy: PolicyConfig, trainer: TrainerConfig) -> PolicySettings:
    f, t, lc = policy.flow, policy.think, trainer.loss
    think = ThinkConfig(max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_p=t.top_p) if t.enabled else None
    flow = FlowConfig(num_steps=f.num_steps, shift=f.shift, window_size=f.window_size,
                      window_start=(f.window_start[0], f.window_start[1]), noise_level=f.noise_level,
                      sigma_at_one=f.sigma_at_one, noise_block=f.noise_block, shared_start=f.shared_start,
                      cfg=CFGConfig(text_scale=f.cfg_text_scale))
    loss = LossConfig(image_clip=lc.image_clip, text_clip_low=lc.text_clip_low, text_clip_high=lc.text_clip_high,
                      image_kl_weight=lc.image_kl_weight, image_kl_scale=lc.image_kl_scale,
                      text_kl_weight=lc.text_kl_weight)
    edit = CFGConfig(text_scale=f.cfg_text_scale, image_scale=f.cfg_image_scale, renorm_type="text_channel")
    return PolicySettings(think=think, flow=flow, loss=loss, canvas_size=policy.canvas_size,
                          edit_guidance=edit)


def load_policy(policy: PolicyConfig) -> UnifiedModel:
    """The shipped (or configured) checkpoint, trainable: LoRA adapters only, or all weights but the
    fixed position tables. Returned in train mode (no dropout in this model; mode only matters for peft)."""
    from umm.checkpoint import load_pretrained

    saved = load_pretrained(policy.checkpoint, base=policy.base)
    model = UnifiedModel(saved.cfg)                  # fresh module: its own requires_grad pattern
    model.load_state_dict(saved.state_dict())
    return with_lora(model, policy)


def with_lora(model: UnifiedModel, policy: PolicyConfig) -> UnifiedModel:
    """The LoRA adapters when `policy.lora` is on (everything else frozen); the model unchanged otherwise."""
    from umm.lora import LoRAConfig, apply_lora

    if policy.lora.enabled:
        apply_lora(model, LoRAConfig(rank=policy.lora.rank, alpha=policy.lora.alpha))
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "generation_config.json")


def save_policy(model: UnifiedModel, policy: PolicyConfig, directory: str | Path) -> Path:
    """The trained policy as a checkpoint `policy.checkpoint=<directory>` loads: LoRA folded into the
    base weights (the live model is not changed), the source checkpoint's tokenizer files beside it."""
    from umm.checkpoint import save_pretrained
    from umm.lora import merged_state_dict

    tokenizer = [Path(policy.checkpoint) / name for name in TOKENIZER_FILES]
    return save_pretrained(model, directory, state=merged_state_dict(model),
                           copy_files=[f for f in tokenizer if f.exists()])


def policy_factory(policy: PolicyConfig):
    """A picklable zero-argument model factory (for learner ranks built in other processes)."""
    return _Factory(policy)


@dataclass(frozen=True)
class _Factory:
    """`factory()` builds the whole policy (rollout actors, sync mode). A ZeRO-3 learner instead builds
    `skeleton()` under `deepspeed.zero.Init` (partitioned as it is built), fills it from `weights()`
    bucket by bucket (actors.zero_build) and then calls `finish` (LoRA), so no rank ever holds the
    whole model."""
    policy: PolicyConfig

    def __call__(self) -> UnifiedModel:
        return load_policy(self.policy)

    def skeleton(self) -> UnifiedModel:
        """The policy's modules with their trainable pattern; values are overwritten by `weights()`."""
        from umm.checkpoint import read_config
        return UnifiedModel(read_config(self.policy.checkpoint, base=self.policy.base))

    def weights(self):
        """The checkpoint's tensors by parameter name, read one at a time (umm.checkpoint.CheckpointTensors)."""
        from umm.checkpoint import CheckpointTensors, read_config
        return CheckpointTensors(self.policy.checkpoint, read_config(self.policy.checkpoint, base=self.policy.base))

    def finish(self, model: UnifiedModel) -> UnifiedModel:
        """What `load_policy` does after loading: the LoRA adapters when LoRA is on."""
        return with_lora(model, self.policy)


class PromptStream:
    """Training prompts: families in turn from `families`, seeded, never a held-out benchmark text."""

    def __init__(self, families: list[str], *, seed: int, canvas_size: int) -> None:
        self.families, self.canvas_size = list(families), canvas_size
        self.rng = random.Random(seed)
        self.index = 0

    def next_prompt(self) -> Prompt:
        while True:
            fam = self.rng.choice(self.families)
            p = generate(fam, self.rng, canvas_size=self.canvas_size)
            if not is_held_out(p.text, family=p.family, canvas_size=self.canvas_size):
                return p

    def next_request(self, *, group_size: int, base_seed: int, policy_version: int) -> GroupRequest:
        i = self.index
        self.index += 1
        return GroupRequest(index=i, prompt=self.next_prompt(), group_size=group_size,
                            seed=base_seed * 1_000_003 + i, policy_version=policy_version)


def draw_prompt(tok, prompt: Prompt, *, think: bool) -> DrawPrompt:
    from shapes.evaluate import draw_prompts
    return draw_prompts(tok, [prompt], think=think)[0]


def to_uint8(model: UnifiedModel, latents: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """Final latent tokens (B, n, D) -> images (B, H, W, 3) uint8."""
    px = model.tokens_to_image(latents.float(), hw)
    return ((px.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _draw_group(model: UnifiedModel, tok, req: GroupRequest | RefineRequest, dp: DrawPrompt,
                settings: PolicySettings, *, think: ThinkConfig | None, flow: FlowConfig,
                guidance: CFGConfig | None = None) -> tuple[GroupMeta, GroupPayload, np.ndarray]:
    """Roll out G copies of one request's context: the trajectories (payload), the plans and the images."""
    import time

    from shapes.tokenizer import decode
    t0 = time.perf_counter()
    dps = [DrawPrompt(prefix=list(dp.prefix), text=dp.text) for _ in range(req.group_size)]
    hw = model.latent_grid(settings.canvas_size, settings.canvas_size)
    gen = torch.Generator().manual_seed(req.seed)
    ro = rollout(model, dps, hw=hw, think=think, flow=flow, generator=gen, policy_version=req.policy_version)
    images = to_uint8(model, ro.flow.latents[-1], hw)
    vocab = tok.get_vocab_size()
    plans = tuple(decode(tok, [int(t) for t, m in zip(row, mask) if m and int(t) < vocab])
                  for row, mask in zip(ro.think.tokens, ro.think.mask))
    # judged where the images are (~3 ms each): a Ray task per group would start a fresh worker process
    meta = GroupMeta(index=req.index, prompt_id=req.prompt.id, policy_version=req.policy_version, plans=plans,
                     judged=tuple(judge_group(images, req.prompt)), seconds=time.perf_counter() - t0)
    return meta, GroupPayload(index=req.index, draw_prompts=dps, rollout=ro, guidance=guidance), images


@torch.no_grad()
def sample_group(model: UnifiedModel, tok, req: GroupRequest, settings: PolicySettings
                 ) -> tuple[GroupMeta, GroupPayload, np.ndarray]:
    """G think-then-draw trajectories of one prompt (deterministic given the seed and the weights)."""
    dp = draw_prompt(tok, req.prompt, think=settings.think is not None)
    return _draw_group(model, tok, req, dp, settings, think=settings.think, flow=settings.flow)


@torch.no_grad()
def refine_group(model: UnifiedModel, tok, req: RefineRequest, settings: PolicySettings
                 ) -> tuple[GroupMeta, GroupPayload, np.ndarray]:
    """G edits of `req.source` following `req.instruction` (SDE path with log-probs, edit CFG: text and
    source image), deterministic given the seed and the weights. The reflection text that writes the
    instruction belongs to SRR; here the instruction is given."""
    from dataclasses import replace

    from shapes.evaluate import edit_prompt
    src = np.asarray(req.source)
    if src.dtype != np.uint8 or src.ndim != 3 or src.shape[2] != 3:
        raise ValueError(f"refine request {req.index}: source must be a uint8 (H, W, 3) array, got "
                         f"{src.dtype} {src.shape}")
    return _draw_group(model, tok, req, edit_prompt(tok, src, req.instruction), settings, think=None,
                       flow=replace(settings.flow, cfg=settings.edit_guidance), guidance=settings.edit_guidance)


def judge_group(images: np.ndarray, prompt: Prompt) -> list[bool]:
    """The programmatic judge's strict verdict per image (reported, not the reward)."""
    from shapes.judge import judge
    return [judge(img, prompt.meaning).correct for img in images]


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


def groups_loss(model: UnifiedModel, payloads: list[GroupPayload], advantages: list[list[float]],
                settings: PolicySettings) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over groups of the GRPO loss (text + image, one advantage per trajectory)."""
    if len(payloads) != len(advantages):
        raise ValueError(f"groups_loss: {len(payloads)} groups but {len(advantages)} advantage lists")
    total = torch.zeros(())
    stats = {"image_loss": 0.0, "text_loss": 0.0, "image_clip_frac": 0.0}
    for p, adv in zip(payloads, advantages):
        res = grpo_loss(model, p.draw_prompts, p.rollout, torch.tensor(adv, dtype=torch.float32),
                        think=settings.think, cfg=p.guidance or settings.flow.cfg, loss=settings.loss)
        total = total + res.loss / len(payloads)
        stats["image_loss"] += res.image_loss / len(payloads)
        stats["text_loss"] += res.text_loss / len(payloads)
        stats["image_clip_frac"] += res.image.clipfrac / len(payloads)
    stats["loss"] = float(total.detach())
    return total, stats


def settings_from(cfg: Config) -> PolicySettings:
    return policy_settings(cfg.policy, cfg.trainer)


class LocalReward:
    """DVReward in this process (sync mode): the same DecomposerWorker and VerifierWorker classes the
    Ray pools run, called directly."""

    def __init__(self, cfg: Config) -> None:
        from reward_service.scoring import DecomposerWorker, VerifierWorker
        from reward_service.backends import BackendSpec
        from reward_service.reward import RewardConfig
        r = cfg.reward
        self.decomposer = DecomposerWorker(BackendSpec(name=r.decomposer.name, options=dict(r.decomposer.options)),
                                           cache_path=r.cache or None)
        self.verifier = VerifierWorker(BackendSpec(name=r.verifier.name, options=dict(r.verifier.options)),
                                       reward=RewardConfig(mode=r.mode, parent_rule=r.parent_rule))
        self._sets: dict[str, object] = {}       # prompt id -> question set (never re-decomposed)

    def score(self, prompt: Prompt, images: np.ndarray) -> list[float]:
        from reward_service.scoring import ScoreRequest
        from reward_service.backends import DecomposeRequest
        qs = self._sets.get(prompt.id)
        if qs is None:
            request = DecomposeRequest(prompt=prompt.text, meaning=prompt.meaning)
            qs = self._sets[prompt.id] = self.decomposer.decompose([request]).question_sets[0]
        requests = [ScoreRequest(key=f"{prompt.id}/sample{k}", image=np.ascontiguousarray(img), question_set=qs)
                    for k, img in enumerate(images)]
        return [r.reward for r in self.verifier.score(requests)]


def heldout_verdicts(model: UnifiedModel, tok, ev: EvalConfig, *, shard: tuple[int, int] = (0, 1),
                     progress: bool = False) -> list[tuple[str, bool]]:
    """(category, strict verdict) for the first `ev.prompts_per_category` prompts of each held-out
    shapes-geneval category, `ev.images_per_prompt` images each; `shard=(j, n)`: this worker's share of
    the batches. Seeds are fixed per batch: before/after are paired, and shards drawn by different
    workers pool exactly."""
    from collections import defaultdict

    from shapes.benchmark import benchmark_prompts
    from shapes.evaluate import DrawConfig, evaluate
    per: dict[str, list[Prompt]] = defaultdict(list)
    for p in benchmark_prompts():
        if len(per[p.family]) < ev.prompts_per_category:
            per[p.family].append(p)
    prompts = [p for ps in per.values() for p in ps]
    was_training = model.training
    model.eval()
    _, samples = evaluate(model, tok, prompts, cfg=DrawConfig(num_steps=ev.num_steps, text_scale=ev.cfg_text_scale,
                                                             think=ev.think),
                          images_per_prompt=ev.images_per_prompt, shard=shard, progress=progress)
    model.train(was_training)
    return [(p.family, ok) for p, _, ok, _ in samples]


def evaluate_heldout(model: UnifiedModel, tok, ev: EvalConfig, *, progress: bool = False) -> dict[str, float]:
    """Held-out accuracy per category (and the GenEval mean) in this process."""
    from shapes.evaluate import accuracy
    return accuracy(heldout_verdicts(model, tok, ev, progress=progress))
