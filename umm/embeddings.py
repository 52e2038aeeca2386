"""Embeddings of the generation path: flow timestep and fixed 2-D sin-cos positions.

Both follow DiT (Peebles & Xie 2023) as BAGEL uses them, with BAGEL's parameter names so that the
public checkpoint loads by strict name matching:

    time_embedder.mlp.0.{weight,bias}   (hidden, 256), (hidden,)
    time_embedder.mlp.2.{weight,bias}   (hidden, hidden), (hidden,)
    latent_pos_embed.pos_embed          (max_latent_size^2, hidden)          frozen
    vit_pos_embed.pos_embed             (vit_max_num_patch_per_side^2, hidden) frozen
"""
from __future__ import annotations

import math

import torch
from torch import nn


def flattened_position_ids(h: int, w: int, max_num_patch_per_side: int) -> torch.LongTensor:
    """Row-major ids of an h x w patch grid inside the max x max table: id = row * max + col.

    "Extrapolate" style: a smaller image uses the table's top-left corner, so a patch keeps its
    position id whatever the image size (BAGEL's default for both ViT and latent tokens).
    """
    if not (0 < h <= max_num_patch_per_side and 0 < w <= max_num_patch_per_side):
        raise ValueError(f"patch grid {h}x{w} does not fit in max_num_patch_per_side={max_num_patch_per_side}")
    rows = torch.arange(h).unsqueeze(1)
    cols = torch.arange(w).unsqueeze(0)
    return (rows * max_num_patch_per_side + cols).flatten()


def timestep_frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t (N,) -> (N, dim): [cos(t * f_k) for k<half] ++ [sin(t * f_k) for k<half].

    f_k = max_period^(-k/half). t is used as is (the flow time in [0, 1], not scaled to 1000), as BAGEL does.
    An odd dim gets one trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Flow timestep t (N,) -> (N, hidden): sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_frequencies(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def sincos_2d_table(max_num_patch_per_side: int, hidden_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table (max^2, hidden) in float32, row r*max + c for grid cell (r, c).

    Layout of one row (D = hidden, omega_k = 10000^(-k / (D/4)), k < D/4):
        [ sin(c*omega) | cos(c*omega) | sin(r*omega) | cos(r*omega) ]
    i.e. the first half encodes the COLUMN and the second half the ROW. This is DiT's
    get_2d_sincos_pos_embed as BAGEL calls it (its meshgrid puts w first); the values are also
    stored in the checkpoint, so a mismatch would only matter for freshly built models.
    Computed in float64, then cast.
    """
    if hidden_size % 4:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 for a 2-D sin-cos embedding")
    g = max_num_patch_per_side
    quarter = hidden_size // 4
    omega = 1.0 / 10000.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    idx = torch.arange(g * g)
    rows, cols = (idx // g).double(), (idx % g).double()

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_axis(cols), one_axis(rows)], dim=1).float()


class PositionEmbedding(nn.Module):
    """Lookup in a frozen 2-D sin-cos table: position_ids (N,) -> (N, hidden).

    `pos_embed` is an nn.Parameter with requires_grad=False (not a buffer) because the public
    checkpoint stores it as `<name>.pos_embed`.
    """

    def __init__(self, max_num_patch_per_side: int, hidden_size: int):
        super().__init__()
        self.max_num_patch_per_side = max_num_patch_per_side
        self.hidden_size = hidden_size
        self.pos_embed = nn.Parameter(sincos_2d_table(max_num_patch_per_side, hidden_size), requires_grad=False)

    def forward(self, position_ids: torch.LongTensor) -> torch.Tensor:
        return self.pos_embed[position_ids]
