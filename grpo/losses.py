"""Per-sample GRPO losses: image (Flow-GRPO PPO-clip per SDE step), text (GSPO / token PPO-clip),
and the one combined per-trajectory objective.

Sign convention: these are losses to MINIMISE; a positive advantage makes descent raise logp.
Every function takes explicit shapes and refuses a (B, 1) advantage (which would broadcast
against a (B,) ratio into a B x B matrix and silently mix samples).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TEXT_LEVELS = ("sequence", "token")


@dataclass(frozen=True, kw_only=True)
class LossStats:
    """Diagnostics over the valid (unmasked) entries; NaN ratio stats when there are none."""

    ratio_mean: float
    ratio_max: float
    ratio_min: float
    clipfrac: float  # fraction of entries whose ratio lies outside the clip range
    kl: float  # mean KL estimate (0 when not computed)


def _check_shape(name: str, tensor: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")


def _stats(ratio: Tensor, valid: Tensor, clipped: Tensor, kl: Tensor | None) -> LossStats:
    ratio, valid = ratio.detach(), valid.bool()
    if not valid.any():
        nan = float("nan")
        return LossStats(ratio_mean=nan, ratio_max=nan, ratio_min=nan, clipfrac=0.0, kl=0.0)
    r = ratio[valid]
    return LossStats(
        ratio_mean=float(r.mean()),
        ratio_max=float(r.max()),
        ratio_min=float(r.min()),
        clipfrac=float(clipped[valid].float().mean()),
        kl=0.0 if kl is None else float(kl.detach()[valid].mean()),
    )


def _ppo_clip(ratio: Tensor, adv: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """PPO-clip loss max(-A r, -A clip(r, 1 - low, 1 + high)) and the outside-range mask."""
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - low, 1.0 + high))
    return loss, (ratio < 1.0 - low) | (ratio > 1.0 + high)


def image_ppo_loss(
    logp: Tensor,
    logp_old: Tensor,
    adv: Tensor,
    *,
    clip_eps: float = 1e-5,
    step_mask: Tensor | None = None,
    kl: Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[Tensor, LossStats]:
    """Flow-GRPO PPO-clip loss per trained SDE step -> (per_step_loss (B, K), stats).

        ratio_bk = exp(logp_bk - logp_old_bk)
        loss_bk  = max(-A_b ratio_bk, -A_b clip(ratio_bk, 1 - eps, 1 + eps)) + kl_weight * kl_bk

    logp, logp_old: (B, K) mean-over-elements log-probs (see grpo.sde.gaussian_logp), which is why
    eps is ~1e-5. adv: (B,). step_mask: (B, K) bool, True where the step is trained; masked entries
    are exactly 0. kl: (B, K), e.g. grpo.sde.kl_to_reference per step. The caller weights the sum.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (B, K), got {tuple(logp.shape)}")
    batch, k = logp.shape
    _check_shape("logp_old", logp_old, (batch, k))
    _check_shape("adv", adv, (batch,))
    if step_mask is None:
        step_mask = torch.ones(batch, k, dtype=torch.bool, device=logp.device)
    _check_shape("step_mask", step_mask, (batch, k))
    if kl is not None:
        _check_shape("kl", kl, (batch, k))
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps!r}")

    # masked before exp: a masked step's log-prob may be anything (inf, NaN) and must not reach a
    # gradient (where() passes 0 * NaN = NaN back through the branch it did not take)
    mask = step_mask.bool()
    zeros = torch.zeros_like(logp, dtype=torch.float32)
    ratio = torch.exp(torch.where(mask, logp.float() - logp_old.detach().float(), zeros))
    loss, clipped = _ppo_clip(ratio, adv.detach().float()[:, None], clip_eps, clip_eps)
    if kl is not None and kl_weight != 0.0:
        loss = loss + kl_weight * torch.where(mask, kl.float(), zeros)
    loss = torch.where(mask, loss, zeros)
    return loss, _stats(ratio, mask, clipped, kl)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean over mask (B, T) -> (B,); rows with no valid entry give 0."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1)


def text_grpo_loss(
    logp: Tensor,
    logp_old: Tensor,
    mask: Tensor,
    adv: Tensor,
    *,
    level: str = "sequence",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    logp_ref: Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[Tensor, LossStats]:
    """PPO-clip loss on the think / reflection tokens -> (per_sample_loss (B,), stats).

    level="sequence" (GSPO-style, the method's choice), with |y_b| valid tokens:
        r_b    = exp( (1/|y_b|) sum_t (logp_bt - logp_old_bt) )
        loss_b = max(-A_b r_b, -A_b clip(r_b, 1 - clip_low, 1 + clip_high))
    level="token": the same clip on each token's ratio, then the masked mean over the sample's tokens.
    Optional k3 KL to the reference, masked mean per sample, added times kl_weight:
        kl_bt = exp(ref_bt - logp_bt) - (ref_bt - logp_bt) - 1
    logp, logp_old, mask (bool), logp_ref: (B, T); adv: (B,). A sample with no valid token gives 0.
    """
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (B, T), got {tuple(logp.shape)}")
    batch, length = logp.shape
    _check_shape("logp_old", logp_old, (batch, length))
    _check_shape("mask", mask, (batch, length))
    _check_shape("adv", adv, (batch,))
    if logp_ref is not None:
        _check_shape("logp_ref", logp_ref, (batch, length))
    if level not in TEXT_LEVELS:
        raise ValueError(f"level must be one of {TEXT_LEVELS}, got {level!r}")
    if not (0 < clip_low < 1 and clip_high > 0):
        raise ValueError(f"clip_low must lie in (0, 1) and clip_high be > 0, got {clip_low!r}, {clip_high!r}")

    mask = mask.bool()
    has_tokens = mask.any(dim=1)
    adv = adv.detach().float()
    log_ratio = torch.where(mask, logp.float() - logp_old.detach().float(), torch.zeros_like(logp, dtype=torch.float32))
    if level == "sequence":
        ratio = torch.exp(_masked_mean(log_ratio, mask))
        loss, clipped = _ppo_clip(ratio, adv, clip_low, clip_high)
        stat_ratio, stat_valid, stat_clipped = ratio, has_tokens, clipped
    else:
        ratio = torch.exp(log_ratio)
        tok_loss, clipped = _ppo_clip(ratio, adv[:, None], clip_low, clip_high)
        loss = _masked_mean(tok_loss, mask)
        stat_ratio, stat_valid, stat_clipped = ratio, mask, clipped

    kl_mean = None
    if logp_ref is not None:
        delta = torch.where(mask, logp_ref.detach().float() - logp.float(), torch.zeros_like(log_ratio))
        kl_mean = _masked_mean(torch.exp(delta) - delta - 1.0, mask)
        loss = loss + kl_weight * kl_mean
    loss = torch.where(has_tokens, loss, torch.zeros_like(loss))
    stats = _stats(stat_ratio, stat_valid, stat_clipped, None)
    if kl_mean is not None and has_tokens.any():
        stats = LossStats(**{**stats.__dict__, "kl": float(kl_mean.detach()[has_tokens].mean())})
    return loss, stats


TEXT_WEIGHT_MODES = ("rt2i", "srr")


def text_weight_for(mode: str, n_trained_steps: int) -> float:
    """Weight of the text loss in `trajectory_loss`.

    "rt2i": n_trained_steps (the think text counts like all trained image steps together);
    "srr":  1.0 (the reflection text counts like one image step).
    """
    if mode not in TEXT_WEIGHT_MODES:
        raise ValueError(f"mode must be one of {TEXT_WEIGHT_MODES}, got {mode!r}")
    if not isinstance(n_trained_steps, int) or n_trained_steps < 0:
        raise ValueError(f"n_trained_steps must be an int >= 0, got {n_trained_steps!r}")
    return float(n_trained_steps) if mode == "rt2i" else 1.0


def trajectory_loss(
    *, image_step_loss: Tensor, image_step_mask: Tensor, text_loss: Tensor | None, text_weight: float | Tensor
) -> Tensor:
    """The one combined objective (scalar): a weighted mean per trajectory, then a mean over B.

        L_b = ( sum_k mask_bk * image_step_loss_bk + w_b * text_loss_b ) / ( sum_k mask_bk + w_b )
        L   = mean_b L_b

    image_step_loss, image_step_mask: (B, K); text_loss: (B,) or None (no text term, w treated as 0);
    text_weight w: float or (B,) tensor, >= 0 (see `text_weight_for`). A trajectory with nothing to
    train (no step, w = 0) contributes 0 but still counts in the mean over B.
    """
    if image_step_loss.dim() != 2:
        raise ValueError(f"image_step_loss must have shape (B, K), got {tuple(image_step_loss.shape)}")
    batch = image_step_loss.shape[0]
    _check_shape("image_step_mask", image_step_mask, tuple(image_step_loss.shape))
    weight = torch.as_tensor(text_weight, dtype=torch.float32, device=image_step_loss.device)
    if weight.dim() != 0:
        _check_shape("text_weight", weight, (batch,))
    if (weight < 0).any():
        raise ValueError("text_weight must be >= 0")
    mask = image_step_mask.bool()
    numer = torch.where(mask, image_step_loss.float(), torch.zeros_like(image_step_loss, dtype=torch.float32)).sum(1)
    if text_loss is None:
        weight = torch.zeros((), device=image_step_loss.device)
    else:
        _check_shape("text_loss", text_loss, (batch,))
        numer = numer + weight * text_loss.float()
    denom = mask.sum(dim=1).float() + weight
    return (numer / denom.clamp(min=1e-12)).mean()
