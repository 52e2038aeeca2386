"""Image autoencoders of the generation path, behind one interface, and the FLUX `ae.safetensors` layout.

    ae = build_vae(cfg)            # cfg: umm.config.VAEConfig
    z = ae.encode(x)               # x (B, 3, H, W) in [-1, 1] -> z (B, ae.z_channels, H/d, W/d), d = ae.downsample
    x_rec = ae.decode(z)           # back to pixels, approximately [-1, 1] (not clamped)

kind "kl": diffusers AutoencoderKL (the FLUX 16-channel AE for the real model). Encoding uses the
posterior MEAN (deterministic), normalised z = (mean - shift_factor) * scaling_factor; decode inverts it.
The wrapper holds the diffusers model as `.kl`, so its state_dict keys are `kl.<diffusers name>`.

kind "pixel": the embedded shapes world's "patchify-only autoencoder": parameter-free space-to-depth,
(B, 3, H, W) -> (B, 3*d*d, H/d, W/d) with channel index c*d*d + i*d + j for the pixel at offset (i, j)
of its d x d block (torch.pixel_unshuffle). decode is pixel_shuffle, so decode(encode(x)) == x bitwise.
Pixels stay in [-1, 1]; scaling_factor / shift_factor are ignored. It has no weights: `load_ae` returns
it as built and `save_ae` writes nothing.

The public BAGEL `ae.safetensors` uses the original FLUX / LDM names (encoder.down.<i>.block.<j>.norm1,
encoder.mid.attn_1.q with 1x1-conv weights, decoder.up.<k> with k counted from the HIGHEST resolution,
norm_out, nin_shortcut). `flux_ae_to_diffusers` / `diffusers_to_flux_ae` translate between the layouts;
`load_ae` / `save_ae` read and write the FLUX layout with a strict name and shape check.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from umm.config import VAEConfig
from umm.errors import CheckpointError, describe_mismatch


class ImageAutoencoder(nn.Module):
    """Common interface: encode (B,3,H,W) in [-1,1] -> normalised latents; decode inverts."""

    kind: str
    downsample: int
    z_channels: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_images(self, images: torch.Tensor) -> None:
        d = self.downsample
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] % d or images.shape[3] % d:
            raise ValueError(f"expected images (B, 3, H, W) with H, W multiples of {d}, got {tuple(images.shape)}")


class PixelAutoencoder(ImageAutoencoder):
    """Patchify-only autoencoder (space-to-depth); exact, parameter-free."""

    kind = "pixel"

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.downsample = cfg.downsample
        self.z_channels = 3 * cfg.downsample ** 2

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return F.pixel_unshuffle(images, self.downsample)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.downsample)


class KLAutoencoder(ImageAutoencoder):
    """diffusers AutoencoderKL in FLUX configuration (no quant convs, attention in the mid blocks)."""

    kind = "kl"

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        from diffusers import AutoencoderKL  # heavy import, only when a KL AE is built

        n = len(cfg.block_out_channels)
        self.downsample = cfg.downsample
        self.z_channels = cfg.z_channels
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.shift_factor
        self.kl = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            act_fn="silu", latent_channels=cfg.z_channels, norm_num_groups=cfg.norm_num_groups,
            scaling_factor=cfg.scaling_factor, shift_factor=cfg.shift_factor,
            use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        mean = self.kl.encode(images.to(self.kl.dtype)).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.kl.dtype) / self.scaling_factor + self.shift_factor
        return self.kl.decode(z).sample


def build_vae(cfg: VAEConfig) -> ImageAutoencoder:
    """The autoencoder a VAEConfig describes, with freshly initialised weights (kind "kl")."""
    cfg.validate()
    return PixelAutoencoder(cfg) if cfg.kind == "pixel" else KLAutoencoder(cfg)


# ---------------------------------------------------------------------------------------------------
# FLUX / LDM <-> diffusers names. Keys that match no rule pass through unchanged, so a strict load
# reports them instead of silently dropping them.
# ---------------------------------------------------------------------------------------------------

_ATTN_FLUX_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_DIFFUSERS_TO_FLUX = {v: k for k, v in _ATTN_FLUX_TO_DIFFUSERS.items()}


def _num_levels(keys, pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
    return max(idx) + 1 if idx else 0


def _flux_key_to_diffusers(key: str, n: int) -> str:
    resnet = lambda s: s.replace("nin_shortcut", "conv_shortcut")  # noqa: E731
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.+)", key):  # FLUX counts up levels from the top
        return f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
        return f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key):
        return f"{m[1]}.mid_block.attentions.0.{_ATTN_FLUX_TO_DIFFUSERS[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    return key


def _diffusers_key_to_flux(key: str, n: int) -> str:
    resnet = lambda s: s.replace("conv_shortcut", "nin_shortcut")  # noqa: E731
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{resnet(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{resnet(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\."
                         r"(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{_ATTN_DIFFUSERS_TO_FLUX[m[2]]}.{m[3]}"
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
        return f"{m[1]}.norm_out.{m[2]}"
    return key


def _is_attn_proj_weight(key: str) -> bool:
    return bool(re.search(r"\.mid(_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)|\.attn_1\.(q|k|v|proj_out))"
                          r"\.weight$", key))


def flux_ae_to_diffusers(state_dict: dict[str, torch.Tensor], *,
                         num_levels: int | None = None) -> dict[str, torch.Tensor]:
    """FLUX/LDM-named AE weights -> diffusers AutoencoderKL names (attention 1x1 convs -> linears).

    num_levels (len(block_out_channels)) is read from the keys when not given; it is needed because
    FLUX numbers decoder levels from the highest resolution and diffusers from the lowest.
    """
    n = num_levels or _num_levels(state_dict, r"(?:encoder\.down|decoder\.up)\.(\d+)\.")
    out = {}
    for key, t in state_dict.items():
        if _is_attn_proj_weight(key) and t.ndim == 4:
            t = t[:, :, 0, 0]
        out[_flux_key_to_diffusers(key, n)] = t
    return out


def diffusers_to_flux_ae(state_dict: dict[str, torch.Tensor], *,
                         num_levels: int | None = None) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL names -> FLUX/LDM names (attention linears -> 1x1 convs); inverse of the above."""
    n = num_levels or _num_levels(state_dict, r"(?:encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.")
    out = {}
    for key, t in state_dict.items():
        if _is_attn_proj_weight(key) and t.ndim == 2:
            t = t[:, :, None, None]
        out[_diffusers_key_to_flux(key, n)] = t
    return out


def save_ae(ae: ImageAutoencoder, path: str | Path) -> Path | None:
    """Write the AE's weights to `path` in the FLUX layout (safetensors). Pixel AE: nothing, returns None."""
    if isinstance(ae, PixelAutoencoder):
        return None
    from safetensors.torch import save_file

    n = len(ae.kl.config.block_out_channels)
    flux = diffusers_to_flux_ae(ae.kl.state_dict(), num_levels=n)
    save_file({k: v.detach().contiguous().cpu() for k, v in flux.items()}, str(path))
    return Path(path)


def load_ae(path: str | Path | None, cfg: VAEConfig) -> ImageAutoencoder:
    """Build the AE for `cfg` and load FLUX-layout weights from `path` with a strict check.

    Raises CheckpointError naming the file, with missing / unexpected keys and shape mismatches given in
    the file's (FLUX) names. Tensors are cast to the model's dtype. Pixel AE: `path` is ignored.
    """
    ae = build_vae(cfg)
    if isinstance(ae, PixelAutoencoder):
        return ae
    from safetensors.torch import load_file

    n = len(cfg.block_out_channels)
    flux_sd = load_file(str(path))
    expected = ae.kl.state_dict()
    flux_name = {_flux_key_to_diffusers(k, n): k for k in flux_sd}  # diffusers name -> name in the file
    loaded = flux_ae_to_diffusers(flux_sd, num_levels=n)
    if len(loaded) != len(flux_sd):
        raise CheckpointError(f"checkpoint {path}: several keys map to the same diffusers name")
    missing = [_diffusers_key_to_flux(k, n) for k in expected if k not in loaded]
    unexpected = [flux_name[k] for k in loaded if k not in expected]
    shape_mismatch = [
        f"{flux_name[k]} file {tuple(flux_sd[flux_name[k]].shape)} vs model "
        f"{tuple(expected[k].shape) + ((1, 1) if _is_attn_proj_weight(k) else ())}"
        for k in loaded if k in expected and loaded[k].shape != expected[k].shape]
    if missing or unexpected or shape_mismatch:
        raise CheckpointError(describe_mismatch(path, missing=missing, unexpected=unexpected,
                                                shape_mismatch=shape_mismatch))
    ae.kl.load_state_dict(loaded, strict=True)
    return ae
