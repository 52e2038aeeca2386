"""Reward rules of self-reflective refinement (SRR) training, on plain tensors and lists.

SRR per prompt: stage 1 draws several deterministic images and scores them; the lowest-reward one
is the initial image. Stage 2 rolls out n reflect-and-edit refinements of it. Two rules follow:

1. False-positive rectification (`rectify_false_positives`): a refinement that does not beat its
   initial image (reward <= initial) gets the minimum stage-1 reward of its prompt, so a "fixed it"
   that did not help is never rewarded above the floor and all non-improvements tie there.
2. Skip rule (`should_skip_step`): if no refinement improved on its initial image anywhere in the
   batch, the step carries no useful signal and is skipped.
"""
from __future__ import annotations

import torch
from torch import Tensor


def improved(refined_rewards: Tensor, initial_reward: float) -> Tensor:
    """(n,) bool: which refinements strictly beat their initial image's reward."""
    if refined_rewards.dim() != 1:
        raise ValueError(f"refined_rewards must have shape (n,), got {tuple(refined_rewards.shape)}")
    return refined_rewards > initial_reward


def rectify_false_positives(
    refined_rewards: Tensor, initial_reward: float, stage1_rewards: Tensor
) -> tuple[Tensor, int]:
    """Replace non-improving refinement rewards by min(stage1_rewards) -> (rewards (n,), n_rectified).

        r'_j = r_j                     if r_j > r_initial
             = min_i stage1_rewards_i  otherwise

    refined_rewards: (n,) rewards of one prompt's refinements; initial_reward: reward of the image
    they refine; stage1_rewards: (m,) rewards of that prompt's stage-1 images (m >= 1).
    n_rectified counts the replaced entries (including those whose value happened not to change).
    """
    if stage1_rewards.dim() != 1 or stage1_rewards.numel() == 0:
        raise ValueError(f"stage1_rewards must have shape (m,) with m >= 1, got {tuple(stage1_rewards.shape)}")
    if not torch.isfinite(torch.as_tensor(initial_reward)):
        raise ValueError(f"initial_reward must be finite, got {initial_reward!r}")
    better = improved(refined_rewards, initial_reward)
    floor = stage1_rewards.min().to(refined_rewards.dtype)
    rewards = torch.where(better, refined_rewards, floor.expand_as(refined_rewards))
    return rewards, int((~better).sum())


def should_skip_step(improved_any_per_group: list[bool]) -> bool:
    """True when no group of the batch has a refinement that improved on its initial image.

    improved_any_per_group[g] = improved(refined_rewards_g, initial_reward_g).any() for prompt g.
    With no improvement anywhere, after rectification every group is flat (adv = 0): skip the step
    rather than spend a learner update on it. The caller logs the skip.
    """
    if len(improved_any_per_group) == 0:
        raise ValueError("improved_any_per_group must not be empty")
    return not any(bool(flag) for flag in improved_any_per_group)


PICKS: tuple[str, ...] = ("lowest", "softmax")


def pick_initial(stage1_rewards: Tensor, *, pick: str = "lowest", temperature: float = 0.1,
                 generator: torch.Generator | None = None) -> int:
    """The stage-1 image SRR refines: the lowest-reward one, or one drawn with p ∝ softmax(-r / τ).

        "lowest":   argmin_i r_i (the first of ties)
        "softmax":  i ~ Categorical(softmax(-r / temperature)); temperature -> 0 approaches "lowest"
    """
    if stage1_rewards.dim() != 1 or stage1_rewards.numel() == 0:
        raise ValueError(f"stage1_rewards must have shape (m,) with m >= 1, got {tuple(stage1_rewards.shape)}")
    if not torch.isfinite(stage1_rewards).all():
        raise ValueError(f"stage1_rewards must be finite, got {stage1_rewards.tolist()}")
    if pick == "lowest":
        return int(torch.argmin(stage1_rewards))
    if pick != "softmax":
        raise ValueError(f"pick must be one of {PICKS}, got {pick!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    probs = torch.softmax(-stage1_rewards.double() / temperature, dim=0)
    return int(torch.multinomial(probs, 1, generator=generator))
