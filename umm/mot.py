"""Mixture-of-Transformers decoder on transformers' Qwen2 building blocks (BAGEL's language model).

Every layer holds two experts with separate weights: the understanding expert (text and ViT
tokens; the original Qwen2 names) and the generation expert (VAE-latent tokens; the same names
with a `_moe_gen` suffix). Each token goes through exactly one expert for q/k/v/o, q/k norms,
both RMSNorms and the MLP; attention itself is ONE softmax over the whole sequence, so latent
tokens read the text context and (when allowed by the mask) text reads earlier images.

Module and parameter names reproduce the public BAGEL-7B-MoT checkpoint
(`language_model.model.layers.{i}.self_attn.q_proj_moe_gen.weight`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
)

from umm.config import LLMConfig
from umm.sequence import Packed


@dataclass(kw_only=True)
class KVCache:
    """Keys/values of an encoded context, per layer, for a batch of rows.

    Functional: `MoTModel.forward(..., cache=c, update_cache=True)` returns a NEW cache and leaves
    `c` untouched, so one encoded prompt can serve many continuations (CFG branches, a GRPO group).
    """
    keys: list[Tensor]    # per layer (B, kv_heads, Lc, head_dim)
    values: list[Tensor]  # per layer (B, kv_heads, Lc, head_dim)
    valid: Tensor         # (B, Lc) bool, real (non-padding) keys
    next_pos: Tensor      # (B,) long, next RoPE position of each row

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def select(self, index: Tensor) -> "KVCache":
        """Rows `index` (e.g. repeat_interleave to fan one prompt out to a group)."""
        return KVCache(keys=[k[index] for k in self.keys], values=[v[index] for v in self.values],
                       valid=self.valid[index], next_pos=self.next_pos[index])

    def repeat_interleave(self, n: int) -> "KVCache":
        return self.select(torch.arange(self.batch_size, device=self.valid.device).repeat_interleave(n))

    @staticmethod
    def empty(batch_size: int, *, num_layers: int, kv_heads: int, head_dim: int,
              device=None, dtype=torch.float32) -> "KVCache":
        z = torch.zeros(batch_size, kv_heads, 0, head_dim, device=device, dtype=dtype)
        return KVCache(keys=[z] * num_layers, values=[z] * num_layers,
                       valid=torch.zeros(batch_size, 0, dtype=torch.bool, device=device),
                       next_pos=torch.zeros(batch_size, dtype=torch.long, device=device))


class Routing:
    """Which flattened tokens go to which expert; computed once per forward."""

    def __init__(self, gen_mask: Tensor):
        self.shape = gen_mask.shape
        flat = gen_mask.reshape(-1)
        n_gen = int(flat.sum())
        self.mode = "und" if n_gen == 0 else "gen" if n_gen == flat.numel() else "mixed"
        if self.mode == "mixed":
            self.gen_idx = flat.nonzero().squeeze(1)
            self.und_idx = (~flat).nonzero().squeeze(1)

    def apply(self, x: Tensor, und: Callable[[Tensor], Tensor], gen: Callable[[Tensor], Tensor]) -> Tensor:
        """y[token] = und(x[token]) or gen(x[token]); x is (B, L, d_in)."""
        if self.mode == "und":
            return und(x)
        if self.mode == "gen":
            return gen(x)
        flat = x.reshape(-1, x.shape[-1])
        y_und, y_gen = und(flat[self.und_idx]), gen(flat[self.gen_idx])
        out = y_und.new_empty(flat.shape[0], y_und.shape[-1])
        out = out.index_copy(0, self.und_idx, y_und).index_copy(0, self.gen_idx, y_gen.to(y_und.dtype))
        return out.view(*self.shape, -1)


class MoTAttention(nn.Module):
    """Qwen2 attention with per-expert q/k/v/o projections and q/k RMSNorms."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h, q_dim, kv_dim = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(h, q_dim, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(h, kv_dim, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(h, kv_dim, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(q_dim, h, bias=False))
            norm = (lambda: Qwen2RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)) if cfg.qk_norm else nn.Identity
            setattr(self, f"q_norm{suffix}", norm())
            setattr(self, f"k_norm{suffix}", norm())

    def _project(self, proj: nn.Module, norm: nn.Module, heads: int):
        """Linear projection followed by the per-head RMSNorm, as one callable for routing."""
        return lambda t: norm(proj(t).unflatten(-1, (heads, self.head_dim))).flatten(-2)

    def forward(self, x: Tensor, *, routing: Routing, cos: Tensor, sin: Tensor, attn_mask: Tensor,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, L, hidden); attn_mask (B, L, Lpast + L) bool. Returns output and (k, v) incl. past."""
        B, L, _ = x.shape
        q = routing.apply(x, self._project(self.q_proj, self.q_norm, self.num_heads),
                          self._project(self.q_proj_moe_gen, self.q_norm_moe_gen, self.num_heads))
        k = routing.apply(x, self._project(self.k_proj, self.k_norm, self.kv_heads),
                          self._project(self.k_proj_moe_gen, self.k_norm_moe_gen, self.kv_heads))
        v = routing.apply(x, self.v_proj, self.v_proj_moe_gen)
        q = q.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[:, None],
                                             enable_gqa=self.kv_heads != self.num_heads)
        out = out.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)
        return routing.apply(out, self.o_proj, self.o_proj_moe_gen), (k, v)


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        q2 = cfg.to_qwen2()
        self.self_attn = MoTAttention(cfg)
        self.mlp, self.mlp_moe_gen = Qwen2MLP(q2), Qwen2MLP(q2)
        self.input_layernorm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.input_layernorm_moe_gen = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm_moe_gen = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x: Tensor, *, routing: Routing, cos: Tensor, sin: Tensor, attn_mask: Tensor,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h = routing.apply(x, self.input_layernorm, self.input_layernorm_moe_gen)
        h, kv = self.self_attn(h, routing=routing, cos=cos, sin=sin, attn_mask=attn_mask, past=past)
        x = x + h
        h = routing.apply(x, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        return x + routing.apply(h, self.mlp, self.mlp_moe_gen), kv


class MoTModel(nn.Module):
    """Embeddings + MoT layers + per-expert final norm (`language_model.model` in BAGEL)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.norm_moe_gen = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(cfg.to_qwen2())

    def forward(self, packed: Packed, *, cache: KVCache | None = None,
                update_cache: bool = False) -> tuple[Tensor, KVCache | None]:
        """Run the decoder on a packed batch of new tokens, optionally continuing a cached context.

        The new tokens attend each other by `packed.attn_mask` (see umm.sequence) and every valid
        cached key. Returns the final hidden states (B, L, hidden) — each token normed by its own
        expert's final norm — and, if `update_cache`, a NEW cache holding context + new tokens.
        """
        embeds = packed.embeds
        routing = Routing(packed.gen_mask)
        cos, sin = self.rotary_emb(embeds, packed.position_ids)
        attn_mask = packed.attn_mask
        if cache is not None:
            if cache.batch_size != embeds.shape[0]:
                raise ValueError(f"cache holds {cache.batch_size} rows, input has {embeds.shape[0]}")
            ctx = cache.valid[:, None, :].expand(-1, embeds.shape[1], -1)
            attn_mask = torch.cat([ctx, attn_mask], dim=2)
        x, new_kv = embeds, []
        for i, layer in enumerate(self.layers):
            past = (cache.keys[i], cache.values[i]) if cache is not None else None
            x, kv = layer(x, routing=routing, cos=cos, sin=sin, attn_mask=attn_mask, past=past)
            new_kv.append(kv)
        x = routing.apply(x, self.norm, self.norm_moe_gen)
        if not update_cache:
            return x, None
        prev_valid = cache.valid if cache is not None else packed.valid[:, :0]
        return x, KVCache(keys=[k for k, _ in new_kv], values=[v for _, v in new_kv],
                          valid=torch.cat([prev_valid, packed.valid], dim=1), next_pos=packed.next_pos)


class MoTForCausalLM(nn.Module):
    """`language_model` in BAGEL: the MoT decoder and the LM head."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
