"""Writing: text with per-token log-probs (KV-cached), teacher-forced log-probs, image drawing.

Text. Generation starts by feeding <|im_start|> after the context and stops at <|im_end|>.
Token i is drawn from softmax(logits / temperature) restricted to the top-p nucleus; its recorded
log-prob is log softmax(logits / temperature)[token] over the FULL vocabulary (the policy whose
ratio GRPO takes; the nucleus is a sampling heuristic). temperature = 0 means greedy, recorded at
temperature 1. `token_logprobs` recomputes the same numbers by teacher forcing in one forward:
sampling and recomputation share `_text_step_inputs`, so on-policy they agree to float precision.

Images. `generate_image` integrates the flow from noise (t = 1) to data (t = 0) over a given
timestep grid, evaluating the guided velocity (umm.guidance) at each step and delegating the
update to `step_fn(x, v, t, t_next, i)` — the Euler ODE by default; GRPO passes its SDE step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import Tensor

from umm.context import GuidanceContexts
from umm.guidance import CFGConfig, guided_velocity
from umm.model import UnifiedModel
from umm.mot import KVCache
from umm.sequence import Packed, attention_rule


@dataclass(kw_only=True)
class TextSample:
    tokens: Tensor    # (B, T) long; `pad` after a row's end
    mask: Tensor      # (B, T) bool; generated tokens, including the closing <|im_end|>
    logp: Tensor      # (B, T) fp32 log-probs at the sampling temperature; 0 on padding
    finished: Tensor  # (B,) bool; the row produced <|im_end|> within the budget


def _text_step_inputs(model: UnifiedModel, ids: Tensor, valid: Tensor, start_pos: Tensor) -> Packed:
    """A causal text block (B, T) continuing a cache at `start_pos`; invalid tokens are masked."""
    B, T = ids.shape
    dev = ids.device
    embeds = model.language_model.model.embed_tokens(ids)
    seg = torch.zeros(B, T, dtype=torch.long, device=dev)
    attn = attention_rule(seg, valid=valid, full=torch.zeros_like(valid),
                          hidden_from_later=torch.zeros_like(valid))
    pos = start_pos[:, None] + torch.arange(T, device=dev)[None]
    return Packed(embeds=embeds, position_ids=pos, gen_mask=torch.zeros_like(valid), valid=valid,
                  attn_mask=attn, segment_ids=seg.masked_fill(~valid, -1),
                  next_pos=start_pos + valid.sum(1), spans=[[(0, T)]] * B)


def _logp(logits: Tensor, tokens: Tensor, temperature: float) -> Tensor:
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.float() / scale, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def sample_next(logits: Tensor, *, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row from logits (B, V) with temperature and nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_text(model: UnifiedModel, cache: KVCache, *, max_new_tokens: int, temperature: float = 1.0,
                  top_p: float = 1.0, generator: torch.Generator | None = None) -> TextSample:
    """Sample a reply after `cache` for every row (the cache itself is not modified)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    tok = model.cfg.tokens
    B, dev = cache.batch_size, cache.valid.device
    cur = torch.full((B,), tok.bos, dtype=torch.long, device=dev)
    alive = torch.ones(B, dtype=torch.bool, device=dev)
    tokens, logps, masks = [], [], []
    for _ in range(max_new_tokens):
        packed = _text_step_inputs(model, cur[:, None], alive[:, None], cache.next_pos)
        hidden, cache = model.language_model.model(packed, cache=cache, update_cache=True)
        logits = model.text_logits(hidden[:, -1])
        nxt = sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)
        nxt = torch.where(alive, nxt, torch.full_like(nxt, tok.pad))
        tokens.append(nxt)
        logps.append(torch.where(alive, _logp(logits, nxt, temperature), torch.zeros(B, device=dev)))
        masks.append(alive.clone())
        alive = alive & (nxt != tok.eos)
        cur = nxt
        if not bool(alive.any()):
            break
    tokens_t, mask_t = torch.stack(tokens, 1), torch.stack(masks, 1)
    finished = ((tokens_t == tok.eos) & mask_t).any(1)
    return TextSample(tokens=tokens_t, mask=mask_t, logp=torch.stack(logps, 1), finished=finished)


def token_logprobs(model: UnifiedModel, cache: KVCache, tokens: Tensor, mask: Tensor, *,
                   temperature: float = 1.0) -> Tensor:
    """Teacher-forced log-probs (B, T) of `tokens` written after `cache`; 0 where ~mask.

    Differentiable: run it under grad (with a context cache computed under grad) for the loss.
    """
    if tokens.shape != mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} differ")
    tok = model.cfg.tokens
    B, T = tokens.shape
    inputs = torch.cat([torch.full((B, 1), tok.bos, dtype=torch.long, device=tokens.device),
                        tokens[:, :-1].masked_fill(~mask[:, :-1], tok.pad)], dim=1)
    valid = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=mask.device), mask[:, :-1]], dim=1)
    packed = _text_step_inputs(model, inputs, valid, cache.next_pos)
    hidden, _ = model.language_model.model(packed, cache=cache)
    logp = _logp(model.text_logits(hidden), tokens.masked_fill(~mask, 0), temperature)
    return logp.masked_fill(~mask, 0.0)


class StepFn(Protocol):
    def __call__(self, x: Tensor, v: Tensor, t: float, t_next: float, i: int) -> Tensor: ...


def euler_step(x: Tensor, v: Tensor, t: float, t_next: float, i: int) -> Tensor:
    """Deterministic ODE step x + v·(t_next - t)."""
    return x + v * (t_next - t)


def generate_image(model: UnifiedModel, contexts: GuidanceContexts, *, noise: Tensor, hw: tuple[int, int],
                   timesteps: Tensor, cfg: CFGConfig, step_fn: StepFn | Callable = euler_step) -> Tensor:
    """Draw latent tokens (B, h*w, D) from `noise` by integrating over `timesteps` (1 -> 0).

    Each step calls `guided_velocity` (the policy, CFG inside) and hands the update to `step_fn`.
    Decode the result with `model.tokens_to_image(x, hw)`.
    """
    if timesteps.dim() != 1 or timesteps.numel() < 2:
        raise ValueError("timesteps must be a 1-D grid with at least 2 points")
    x = noise.float()
    for i in range(timesteps.numel() - 1):
        t, t_next = float(timesteps[i]), float(timesteps[i + 1])
        v = guided_velocity(model, x, t, hw=hw, contexts=contexts, cfg=cfg)
        x = step_fn(x, v, t, t_next, i)
    return x
