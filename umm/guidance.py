"""Classifier-free guidance inside the policy: ONE function builds the guided velocity.

Rollout (sampling) and learner (log-prob recomputation) both call `guided_velocity`, with the
same batch composition, so the image-side importance ratio is exactly 1 on-policy.

With v = v(x | full), v_t = v(x | no_text), v_i = v(x | no_image), text scale s_t, image scale s_i:
    u     = v_t + s_t · (v - v_t)                       text guidance
    u'    = v_i + s_i · (u - v_i)                       image guidance (edits; s_i > 1)
    renorm "global":  u' · clamp(|v| / |u'|, renorm_min, 1), norms over each sample's whole latent
    renorm "channel": the same per latent token (norm over the channel dim)
    renorm "text_channel": per-token renorm of u (before image guidance), as BAGEL does for edits
Guidance is active only where interval[0] < t <= interval[1]; elsewhere the velocity is v itself
(selected with torch.where, so an inactive row is bit-identical to the unguided forward).
BAGEL's "global" norm spans its whole packed batch; ours is per sample so that results do not
depend on which other samples share the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from umm.config import ConfigError
from umm.context import GuidanceContexts
from umm.model import UnifiedModel

RENORM_TYPES = ("none", "global", "channel", "text_channel")


@dataclass(kw_only=True)
class CFGConfig:
    """Guidance settings (BAGEL defaults: text 4.0; edits add image 1.5-2.0 and text_channel renorm)."""
    text_scale: float = 4.0                 # 1.0 disables text CFG
    image_scale: float = 1.0                # 1.0 disables image CFG
    interval: tuple[float, float] = (0.4, 1.0)  # active for interval[0] < t <= interval[1]
    renorm_type: str = "global"
    renorm_min: float = 0.0                 # lower clamp of the renorm factor (0 = BAGEL T2I default)

    def validate(self, prefix: str = "cfg") -> "CFGConfig":
        if self.text_scale < 1.0:
            raise ConfigError(f"{prefix}.text_scale: {self.text_scale} < 1.0")
        if self.image_scale < 1.0:
            raise ConfigError(f"{prefix}.image_scale: {self.image_scale} < 1.0")
        lo, hi = self.interval
        if not 0.0 <= lo < hi <= 1.0:
            raise ConfigError(f"{prefix}.interval: need 0 <= lo < hi <= 1, got {self.interval}")
        if self.renorm_type not in RENORM_TYPES:
            raise ConfigError(f"{prefix}.renorm_type: {self.renorm_type!r} not in {list(RENORM_TYPES)}")
        return self

    @property
    def uses_text(self) -> bool:
        return self.text_scale > 1.0

    @property
    def uses_image(self) -> bool:
        return self.image_scale > 1.0


def _renorm(v: Tensor, u: Tensor, *, per_token: bool, lo: float) -> Tensor:
    dims = (-1,) if per_token else tuple(range(1, v.dim()))
    scale = (v.norm(dim=dims, keepdim=True) / (u.norm(dim=dims, keepdim=True) + 1e-8)).clamp(min=lo, max=1.0)
    return u * scale


def combine_guidance(v: Tensor, v_no_text: Tensor | None, v_no_image: Tensor | None,
                     cfg: CFGConfig) -> Tensor:
    """The guided velocity from the branch velocities (B, N, D); pure arithmetic, see module doc."""
    u = v
    if v_no_text is not None:
        u = v_no_text + cfg.text_scale * (v - v_no_text)
        if cfg.renorm_type == "text_channel":
            u = _renorm(v, u, per_token=True, lo=cfg.renorm_min)
    if v_no_image is not None:
        u = v_no_image + cfg.image_scale * (u - v_no_image)
    if cfg.renorm_type in ("global", "channel") and (v_no_text is not None or v_no_image is not None):
        u = _renorm(v, u, per_token=cfg.renorm_type == "channel", lo=cfg.renorm_min)
    return u


def guided_velocity(model: UnifiedModel, x_t: Tensor, t: Tensor | float, *, hw: tuple[int, int],
                    contexts: GuidanceContexts, cfg: CFGConfig, every_branch: bool = False) -> Tensor:
    """The policy's velocity for latent tokens x_t (B, N, D) at time t (scalar or (B,)).

    Branches are evaluated only if guidance is on and active for some row (or always, with
    `every_branch`: the result is the same); rows outside the interval get the plain conditional velocity.
    """
    B = x_t.shape[0]
    t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(B)
    v = model.velocity(x_t, t, hw=hw, cache=contexts.full)
    active = (t > cfg.interval[0]) & (t <= cfg.interval[1])
    use_text = cfg.uses_text and contexts.no_text is not None
    use_image = cfg.uses_image and contexts.no_image is not None
    if cfg.uses_text and contexts.no_text is None:
        raise ValueError("text CFG is on but the no-text context was not encoded")
    if cfg.uses_image and contexts.no_image is None:
        raise ValueError("image CFG is on but the no-image context was not encoded")
    if not (use_text or use_image) or not (every_branch or bool(active.any())):
        return v
    v_t = model.velocity(x_t, t, hw=hw, cache=contexts.no_text) if use_text else None
    v_i = model.velocity(x_t, t, hw=hw, cache=contexts.no_image) if use_image else None
    u = combine_guidance(v, v_t, v_i, cfg)
    return torch.where(active[:, None, None], u, v)
