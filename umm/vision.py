"""Understanding path: SigLIP vision encoder (NaViT style) and the connector into the decoder.

The module tree reproduces the public BAGEL checkpoint's names under its `vit_model.` prefix:

    vision_model.embeddings.patch_embedding.{weight,bias}  (vit_hidden, p*p*C), (vit_hidden,)  a LINEAR
    vision_model.embeddings.position_embedding.weight      (max_side^2, vit_hidden)
    vision_model.encoder.layers.<i>.{layer_norm1,layer_norm2}.{weight,bias}
    vision_model.encoder.layers.<i>.self_attn.{q_proj,k_proj,v_proj,out_proj}.{weight,bias}
    vision_model.encoder.layers.<i>.mlp.{fc1,fc2}.{weight,bias}
    vision_model.post_layernorm.{weight,bias}
    connector.fc1 (llm_hidden, vit_hidden), connector.fc2 (llm_hidden, llm_hidden)   [MLPConnector]

SigLIP's patch embedding is a stride-p convolution; BAGEL turns it into a linear before loading, and its
checkpoint holds that linear with input elements ordered (p, q, c) -- the conv weight (out, c, p, q)
permuted to (out, p, q, c). `patchify` produces tokens in the same order, so linear(patchify(x)) equals
the original convolution. No pooling head (BAGEL drops it, and SigLIP's last layer).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipVisionConfig

from umm.config import ViTConfig
from umm.embeddings import flattened_position_ids


def patchify(image: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) -> (h*w, p*p*C) with h = H/p, w = W/p; token rows row-major, elements ordered (p, q, c).

    Token (i, j) element (a, b, c) is image[c, i*p + a, j*p + b] ('chpwq->hwpqc'). Used for ViT pixels
    and for VAE latents (p = latent patch size).
    """
    c, hh, ww = image.shape
    if hh % p or ww % p:
        raise ValueError(f"image size {hh}x{ww} is not a multiple of patch size {p}")
    h, w = hh // p, ww // p
    x = image.reshape(c, h, p, w, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(h * w, p * p * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int, c: int) -> torch.Tensor:
    """Inverse of `patchify`: (h*w, p*p*c) -> (c, h*p, w*p)."""
    if tokens.shape != (h * w, p * p * c):
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not match h={h} w={w} p={p} c={c}")
    x = tokens.reshape(h, w, p, p, c)
    return torch.einsum("hwpqc->chpwq", x).reshape(c, h * p, w * p)


def image_to_vit_tensor(image: Image.Image | np.ndarray | torch.Tensor, *, patch_size: int, max_side_px: int,
                        min_side_px: int = 0) -> torch.Tensor:
    """RGB image -> (3, H, W) float32 in [-1, 1] (SigLIP: mean 0.5, std 0.5), H and W multiples of patch_size.

    Accepts a PIL image, a uint8 numpy array (H, W, 3) or a uint8 tensor (3, H, W). The image is scaled
    (aspect kept) so that its long side is <= max_side_px and, if min_side_px > 0, its short side >=
    min_side_px (BAGEL's understanding transform uses 980 / 224 with patch 14), then each side is
    rounded to a multiple of patch_size (at least one patch, never above max_side_px). Bicubic resampling.
    """
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"expected a uint8 array, got {image.dtype}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    scale = min(max_side_px / max(w, h), 1.0)
    if min_side_px:
        scale = max(scale, min_side_px / min(w, h))
    cap = max_side_px // patch_size * patch_size

    def fit(x: int) -> int:
        return min(cap, max(patch_size, round(x * scale / patch_size) * patch_size))

    new_w, new_h = fit(w), fit(h)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return x / 127.5 - 1.0


def siglip_config(vit_cfg: ViTConfig, *, attn_implementation: str = "sdpa") -> SiglipVisionConfig:
    """transformers' SiglipVisionConfig for our ViTConfig (image_size is unused: positions come from ids)."""
    return SiglipVisionConfig(
        hidden_size=vit_cfg.hidden_size, intermediate_size=vit_cfg.intermediate_size,
        num_hidden_layers=vit_cfg.num_hidden_layers, num_attention_heads=vit_cfg.num_attention_heads,
        num_channels=vit_cfg.num_channels, patch_size=vit_cfg.patch_size, hidden_act=vit_cfg.hidden_act,
        layer_norm_eps=vit_cfg.layer_norm_eps, attention_dropout=0.0, attn_implementation=attn_implementation,
    )


class SiglipNavitEmbeddings(nn.Module):
    """Patch tokens (N, p*p*C) + flattened position ids (N,) -> (N, hidden)."""

    def __init__(self, vit_cfg: ViTConfig, max_num_patch_per_side: int):
        super().__init__()
        p, c = vit_cfg.patch_size, vit_cfg.num_channels
        self.patch_embedding = nn.Linear(c * p * p, vit_cfg.hidden_size)
        self.position_embedding = nn.Embedding(max_num_patch_per_side ** 2, vit_cfg.hidden_size)

    def forward(self, patches: torch.Tensor, position_ids: torch.LongTensor) -> torch.Tensor:
        return self.patch_embedding(patches) + self.position_embedding(position_ids)


class SiglipNavitTransformer(nn.Module):
    """embeddings -> SigLIP encoder -> post_layernorm (the `vision_model` level of the name tree)."""

    def __init__(self, vit_cfg: ViTConfig, max_num_patch_per_side: int, *, attn_implementation: str = "sdpa"):
        super().__init__()
        self.embeddings = SiglipNavitEmbeddings(vit_cfg, max_num_patch_per_side)
        self.encoder = SiglipEncoder(siglip_config(vit_cfg, attn_implementation=attn_implementation))
        self.post_layernorm = nn.LayerNorm(vit_cfg.hidden_size, eps=vit_cfg.layer_norm_eps)


class SiglipNavitVisionModel(nn.Module):
    """Variable-resolution SigLIP: a list of images -> a list of token embeddings, one per image.

    Images of different sizes are right-padded into one batch; an additive key mask keeps every token
    attending only to its own image's tokens (BAGEL packs them with varlen flash attention, same result).
    """

    def __init__(self, vit_cfg: ViTConfig, max_num_patch_per_side: int, *, attn_implementation: str = "sdpa"):
        super().__init__()
        self.patch_size = vit_cfg.patch_size
        self.max_num_patch_per_side = max_num_patch_per_side
        self.vision_model = SiglipNavitTransformer(vit_cfg, max_num_patch_per_side,
                                                   attn_implementation=attn_implementation)

    def patchify_images(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.LongTensor]]:
        """Images (C, H, W) -> patch tokens (n_i, p*p*C) and flattened position ids (n_i,)."""
        p, patches, ids = self.patch_size, [], []
        for img in images:
            patches.append(patchify(img, p))
            ids.append(flattened_position_ids(img.shape[1] // p, img.shape[2] // p, self.max_num_patch_per_side)
                       .to(img.device))
        return patches, ids

    def encode_patches(self, patches: list[torch.Tensor],
                       position_ids: list[torch.LongTensor]) -> list[torch.Tensor]:
        """Patch tokens (n_i, p*p*C) with position ids (n_i,) -> embeddings (n_i, hidden), per image."""
        vm = self.vision_model
        lens = [x.shape[0] for x in patches]
        n_max = max(lens)
        dtype = vm.embeddings.patch_embedding.weight.dtype
        emb = vm.embeddings(torch.cat(patches).to(dtype), torch.cat(position_ids))
        batch = emb.new_zeros(len(lens), n_max, emb.shape[-1])
        valid = torch.arange(n_max, device=emb.device)[None] < torch.tensor(lens, device=emb.device)[:, None]
        batch[valid] = emb
        mask = None
        if min(lens) < n_max:  # (B, 1, 1, n_max): padded keys get -inf-like bias, for every query row
            mask = torch.zeros(valid.shape, dtype=dtype, device=emb.device)
            mask.masked_fill_(~valid, torch.finfo(dtype).min)
            mask = mask[:, None, None, :]
        hidden = vm.encoder(inputs_embeds=batch, attention_mask=mask).last_hidden_state
        hidden = vm.post_layernorm(hidden)
        return [hidden[i, :n] for i, n in enumerate(lens)]

    def forward(self, images: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.LongTensor]]:
        """Normalised images (C, H, W), sides multiples of p -> tokens (n_i, hidden), position ids (n_i,)."""
        patches, ids = self.patchify_images(images)
        return self.encode_patches(patches, ids), ids


class MLPConnector(nn.Module):
    """ViT features -> decoder width: fc1 (in -> out), activation, fc2 (out -> out)."""

    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))
