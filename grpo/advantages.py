"""Group-relative advantages (GRPO): one scalar per trajectory, shared by its text and image terms.

    adv_i = clip( (r_i - mean_{j in g(i)} r_j) / (std + eps), -clip, clip )

The mean is always per group (per prompt). The std is, by default, over the whole gathered batch
(the method's released code; std_scope="batch"), or within the group (std_scope="group", the
original GRPO). Population std (ddof = 0, like numpy's default): it is defined for a group of one,
where the unbiased estimate would be NaN.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

STD_SCOPES = ("batch", "group")


@dataclass(frozen=True, kw_only=True)
class AdvantageResult:
    """Advantages and what the normalisation saw."""

    adv: Tensor  # (N,) fp32, clipped
    group_index: Tensor  # (N,) long, index of each sample's group in group_ids_unique
    group_ids_unique: Tensor  # (G,) long, sorted distinct group ids
    group_sizes: Tensor  # (G,) long
    zero_variance_groups: list[int]  # group ids whose rewards are all equal (no learning signal)
    n_zero_variance_samples: int  # samples in those groups
    n_clipped: int  # samples whose |adv| hit the clip

    @property
    def n_groups(self) -> int:
        return int(self.group_ids_unique.numel())


def compute_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    std_scope: str = "batch",
    eps: float = 1e-4,
    clip: float = 5.0,
    zero_variance_tol: float = 1e-8,
) -> AdvantageResult:
    """Group-relative advantages for N trajectories; groups may have different sizes.

    rewards: (N,) float; group_ids: (N,) integer id of each sample's prompt group.
    std_scope: "batch" (std over all N rewards) or "group" (std over the sample's group).
    A group is zero-variance when max - min <= zero_variance_tol; its advantages are 0.
    Statistics are computed in float64; adv is returned in fp32.
    """
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"rewards must have shape (N,) with N >= 1, got {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(f"group_ids must have rewards' shape {tuple(rewards.shape)}, got {tuple(group_ids.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards must be finite")
    if std_scope not in STD_SCOPES:
        raise ValueError(f"std_scope must be one of {STD_SCOPES}, got {std_scope!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip!r}")

    r = rewards.detach().to(torch.float64)
    ids, index, sizes = torch.unique(group_ids, sorted=True, return_inverse=True, return_counts=True)
    n_groups = ids.numel()
    group_sum = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, index, r)
    group_mean = group_sum / sizes
    centred = r - group_mean[index]
    if std_scope == "batch":
        std = r.std(unbiased=False).expand_as(r)
    else:
        group_var = torch.zeros_like(group_mean).index_add_(0, index, centred**2) / sizes
        std = group_var.sqrt()[index]
    adv = centred / (std + eps)

    group_max = torch.full_like(group_mean, -torch.inf).scatter_reduce_(0, index, r, reduce="amax")
    group_min = torch.full_like(group_mean, torch.inf).scatter_reduce_(0, index, r, reduce="amin")
    flat = (group_max - group_min) <= zero_variance_tol
    adv = torch.where(flat[index], torch.zeros_like(adv), adv)
    n_clipped = int((adv.abs() > clip).sum())
    return AdvantageResult(
        adv=adv.clamp(-clip, clip).to(torch.float32),
        group_index=index,
        group_ids_unique=ids,
        group_sizes=sizes,
        zero_variance_groups=[int(g) for g in ids[flat]],
        n_zero_variance_samples=int(sizes[flat].sum()),
        n_clipped=n_clipped,
    )


def drop_zero_variance(result: AdvantageResult) -> tuple[Tensor, int]:
    """Which samples to keep when zero-variance groups are dropped: (keep_mask (N,) bool, n_dropped).

    Those samples have adv = 0, so they add no gradient, only compute and a smaller loss mean.
    The caller logs n_dropped; nothing is re-added to make the batch divide evenly.
    """
    flat = torch.zeros(result.n_groups, dtype=torch.bool, device=result.group_index.device)
    if result.zero_variance_groups:
        flat = torch.isin(result.group_ids_unique, torch.tensor(result.zero_variance_groups, device=flat.device))
    keep = ~flat[result.group_index]
    return keep, int((~keep).sum())
