"""Builders shared by the umm tests."""
from __future__ import annotations

import torch
from torch import nn

from umm.config import preset
from umm.model import UnifiedModel


def public_tiny_config():
    """The tiny preset with what a public-layout folder implies for the parts its files do not store
    (umm.checkpoint.ae_config): FLUX's latent scale and shift, GroupNorm groups 16 for 16 channels."""
    cfg = preset("tiny")
    cfg.vae.norm_num_groups, cfg.vae.scaling_factor, cfg.vae.shift_factor = 16, 0.3611, 0.1159
    return cfg.validate()


def tiny_model(*, seed: int = 0, qk_norm: bool = True, scale: float = 0.5, cfg=None) -> UnifiedModel:
    """The tiny preset (or `cfg`) with every weight random (BAGEL zero-inits llm2vae and the norms are
    ones, which would hide bugs: a zero velocity head makes every image test pass trivially)."""
    torch.manual_seed(seed)
    cfg = preset("tiny") if cfg is None else cfg
    cfg.llm.qk_norm = qk_norm
    model = UnifiedModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("vae.") or name.endswith("pos_embed"):
                continue
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(scale * torch.randn_like(p) / max(1, p.shape[-1]) ** 0.5)
    return model.eval()


def rand_image(h: int = 16, w: int = 16, *, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h, w, generator=g) * 2 - 1
