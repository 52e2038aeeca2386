"""SRR episodes on the driver's side, shared by sync mode and the pipeline (no Ray here).

    Episode        one prompt's SRR episode: stage-1 rewards, the initial image chosen, the stage-2 seed
    choose_initial the stage-1 image to refine (grpo.refine.pick_initial, seeded per episode)
    rectify        the refinements' rewards after false-positive rectification, and whether any improved
    TaskMix        how many groups of each task a batch holds (`tasks: {rt2i: w, srr: w}`)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from grpo.groups import GroupRequest
from grpo.refine import improved, pick_initial, rectify_false_positives
from grpo.srr import CandidatesRequest, ReflectRequest, SRRConfig
from worlds.records import PromptRecord

TASKS: tuple[str, ...] = ("rt2i", "srr")
SRR_SEED_OFFSET = 7919           # the SRR prompt stream and seeds differ from RT2I's for the same run seed


@dataclass(kw_only=True)
class Episode:
    """One prompt's SRR episode, as the driver tracks it."""
    index: int                       # position in the SRR stream
    prompt: PromptRecord
    seed: int                        # stage 1 draws with it; stage 2 with seed + 1; the pick with seed + 2
    stage1_version: int              # the policy that drew the candidates
    stage1_rewards: list[float] = field(default_factory=list)
    initial: int = -1                # which candidate is refined

    @classmethod
    def of(cls, req: GroupRequest) -> "Episode":
        """The episode of one request of the SRR stream (its index, prompt, seed; the stage-1 version)."""
        return cls(index=req.index, prompt=req.prompt, seed=req.seed, stage1_version=req.policy_version)

    @property
    def initial_reward(self) -> float:
        return self.stage1_rewards[self.initial]

    def candidates(self, count: int) -> CandidatesRequest:
        return CandidatesRequest(index=self.index, prompt=self.prompt, count=count, seed=self.seed,
                                 policy_version=self.stage1_version)

    def reflect(self, *, group_size: int, policy_version: int) -> ReflectRequest:
        return ReflectRequest(index=self.index, prompt=self.prompt, group_size=group_size, seed=self.seed + 1,
                              policy_version=policy_version)


def choose_initial(episode: Episode, rewards: list[float], cfg: SRRConfig) -> int:
    """Record the stage-1 rewards and choose the image to refine (deterministic per episode)."""
    episode.stage1_rewards = list(rewards)
    gen = torch.Generator().manual_seed(episode.seed + 2)
    episode.initial = pick_initial(torch.tensor(rewards, dtype=torch.float64), pick=cfg.pick,
                                   temperature=cfg.pick_temperature, generator=gen)
    return episode.initial


@dataclass(frozen=True, kw_only=True)
class Rectified:
    rewards: list[float]             # what the group trains on
    improved: int                    # refinements that beat the initial image (strictly)
    rectified: int                   # refinements given the stage-1 minimum


def rectify(episode: Episode, refined: list[float]) -> Rectified:
    """False-positive rectification (grpo.refine): a refinement no better than the initial image gets
    the minimum stage-1 reward of its prompt."""
    r = torch.tensor(refined, dtype=torch.float64)
    rewards, n = rectify_false_positives(r, episode.initial_reward, torch.tensor(episode.stage1_rewards,
                                                                                  dtype=torch.float64))
    return Rectified(rewards=[float(x) for x in rewards], improved=int(improved(r, episode.initial_reward).sum()),
                     rectified=n)


@dataclass(frozen=True, kw_only=True)
class TaskMix:
    """Groups per batch of each task: B * w_srr / (w_rt2i + w_srr) SRR groups (rounded), the rest RT2I."""
    rt2i: int
    srr: int

    @classmethod
    def of(cls, weights: dict[str, float], groups_per_step: int) -> "TaskMix":
        total = weights["rt2i"] + weights["srr"]
        srr = round(groups_per_step * weights["srr"] / total)
        return cls(rt2i=groups_per_step - srr, srr=srr)
