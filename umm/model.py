"""The unified model: one MoT decoder that reads text/images and writes text and images.

    text ids ──embed_tokens──────────────────────────────┐   understanding expert
    image ──SigLIP──connector──+vit_pos_embed────────────┤   (text + ViT tokens)
    image ──VAE──patchify 2x2──vae2llm──+time_emb──+latent_pos_embed──┐ generation expert
                                                          │           │ (VAE-latent tokens)
                                         MoT decoder (one attention over the packed sequence)
                                                          │           │
                                          lm_head ── next-token logits  llm2vae ── velocity v

Rectified flow, BAGEL's convention: x_t = (1 - t)·x_0 + t·noise with t = 1 pure noise, and the
model predicts v = noise - x_0 (pointing from data to noise), so an Euler step towards data is
x ← x + v·dt with dt = t_next - t < 0. Training draws t = sigmoid(n), n ~ N(0, 1), then applies
the shift t' = s·t / (1 + (s - 1)·t) with s = `timestep_shift`; sampling uses its own shift
(3.0 for BAGEL) on a linspace(1, 0) grid — see grpo.sde.timestep_schedule.

Parameter names reproduce BAGEL-7B-MoT's `ema.safetensors`; the autoencoder lives under `vae.`
and is saved separately (umm.checkpoint).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from umm.config import UMMConfig
from umm.embeddings import PositionEmbedding, TimestepEmbedder, flattened_position_ids
from umm.mot import KVCache, MoTForCausalLM
from umm.sequence import Packed, Segment, pack
from umm.vae import build_vae
from umm.vision import MLPConnector, SiglipNavitVisionModel, patchify, unpatchify


class UnifiedModel(nn.Module):
    def __init__(self, cfg: UMMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        h = cfg.llm.hidden_size
        self.language_model = MoTForCausalLM(cfg.llm)
        # understanding path
        self.vit_model = SiglipNavitVisionModel(cfg.vit, cfg.vit_max_num_patch_per_side)
        self.connector = MLPConnector(cfg.vit.hidden_size, h, cfg.connector_act)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, h)
        # generation path
        self.time_embedder = TimestepEmbedder(h)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, h)
        self.llm2vae = nn.Linear(h, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, h)
        self.vae = build_vae(cfg.vae)
        self.vae.requires_grad_(False)
        # BAGEL starts the velocity head at zero: a fresh model predicts v = 0.
        nn.init.zeros_(self.llm2vae.weight)
        nn.init.zeros_(self.llm2vae.bias)

    # ------------------------------------------------------------------ segments
    @property
    def _dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    def _marker(self, token: int) -> Tensor:
        return self.language_model.model.embed_tokens(torch.tensor([token], device=self.vae2llm.weight.device))

    def text_segment(self, ids: Tensor | list[int]) -> Segment:
        """Causal text run of exactly these ids (callers add <|im_start|>/<|im_end|>)."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.vae2llm.weight.device)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"text_segment: need a non-empty 1-D id list, got shape {tuple(ids.shape)}")
        if int(ids.max()) >= self.cfg.llm.vocab_size or int(ids.min()) < 0:
            raise ValueError(f"text_segment: token id outside vocab [0, {self.cfg.llm.vocab_size})")
        e = self.language_model.model.embed_tokens(ids)
        return Segment(embeds=e, gen=torch.zeros(len(ids), dtype=torch.bool, device=e.device),
                       full=False, shared_position=False)

    def _image_block(self, body: Tensor, *, gen: bool, hidden_from_later: bool = False) -> Segment:
        t = self.cfg.tokens
        e = torch.cat([self._marker(t.start_of_image), body.to(self._dtype), self._marker(t.end_of_image)])
        g = torch.zeros(e.shape[0], dtype=torch.bool, device=e.device)
        g[1:-1] = gen
        return Segment(embeds=e, gen=g, full=True, shared_position=True, hidden_from_later=hidden_from_later)

    def vit_segment(self, image: Tensor) -> Segment:
        """Understanding tokens of one image (3, H, W) normalised to [-1, 1]; sides multiple of the patch."""
        tokens, pos_ids = self.vit_model([image.to(self._dtype)])
        body = self.connector(tokens[0]) + self.vit_pos_embed(pos_ids[0])
        return self._image_block(body, gen=False)

    def latent_segment(self, latent_tokens: Tensor, *, t: Tensor | float, hw: tuple[int, int],
                       hidden_from_later: bool = False) -> Segment:
        """Generation tokens of one (noisy, or clean with t=0) latent: (h*w, patch_latent_dim)."""
        h, w = hw
        if latent_tokens.shape != (h * w, self.cfg.patch_latent_dim):
            raise ValueError(f"latent_segment: expected ({h * w}, {self.cfg.patch_latent_dim}), "
                             f"got {tuple(latent_tokens.shape)}")
        if h > self.cfg.max_latent_size or w > self.cfg.max_latent_size:
            raise ValueError(f"latent_segment: {h}x{w} latent grid exceeds max_latent_size={self.cfg.max_latent_size}")
        dev = latent_tokens.device
        t = torch.as_tensor(t, dtype=torch.float32, device=dev).reshape(1)
        pos = flattened_position_ids(h, w, self.cfg.max_latent_size).to(dev)
        body = (self.vae2llm(latent_tokens.to(self._dtype)) + self.time_embedder(t).to(self._dtype)
                + self.latent_pos_embed(pos).to(self._dtype))
        return self._image_block(body, gen=True, hidden_from_later=hidden_from_later)

    # ------------------------------------------------------------------ latents
    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        d = self.cfg.latent_downsample
        if height % d or width % d:
            raise ValueError(f"image size {height}x{width} must be a multiple of {d} (VAE x latent patch)")
        return height // d, width // d

    def image_to_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Pixels (B, 3, H, W) in [-1, 1] -> clean latent tokens (B, h*w, patch_latent_dim)."""
        hw = self.latent_grid(images.shape[-2], images.shape[-1])
        lat = self.vae.encode(images.to(self._dtype))
        p = self.cfg.latent_patch_size
        return torch.stack([patchify(z, p) for z in lat]), hw

    def tokens_to_image(self, tokens: Tensor, hw: tuple[int, int]) -> Tensor:
        """Latent tokens (B, h*w, patch_latent_dim) -> pixels (B, 3, H, W) in [-1, 1]."""
        p, z = self.cfg.latent_patch_size, self.cfg.vae.z_channels
        lat = torch.stack([unpatchify(x, hw[0], hw[1], p, z) for x in tokens])
        return self.vae.decode(lat.to(self._dtype)).clamp(-1, 1)

    # ------------------------------------------------------------------ forward
    def run(self, rows: list[list[Segment]], *, cache: KVCache | None = None,
            update_cache: bool = False) -> tuple[Tensor, Packed, KVCache | None]:
        """Pack rows (continuing `cache` if given) and run the decoder."""
        if cache is not None and cache.batch_size != len(rows):
            raise ValueError(f"cache holds {cache.batch_size} rows, input has {len(rows)}")
        packed = pack(rows, start_pos=None if cache is None else cache.next_pos)
        hidden, new_cache = self.language_model.model(packed, cache=cache, update_cache=update_cache)
        return hidden, packed, new_cache

    def encode(self, rows: list[list[Segment]], *, cache: KVCache | None = None) -> KVCache:
        """Encode context rows into a KV cache (appending to `cache` if given)."""
        return self.run(rows, cache=cache, update_cache=True)[2]

    def velocity(self, x_t: Tensor, t: Tensor, *, hw: tuple[int, int], cache: KVCache) -> Tensor:
        """Predicted flow velocity v = noise - x_0 for latent tokens x_t (B, h*w, D) at times t (B,).

        The latent block [<|vision_start|> x_1..x_N <|vision_end|>] attends to itself fully and to
        the cached context; the cache is not modified.
        """
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        rows = [[self.latent_segment(x_t[b], t=t[b], hw=hw)] for b in range(x_t.shape[0])]
        hidden, _, _ = self.run(rows, cache=cache)
        return self.llm2vae(hidden[:, 1:1 + hw[0] * hw[1]]).float()

    def text_logits(self, hidden: Tensor) -> Tensor:
        return self.language_model.lm_head(hidden).float()
