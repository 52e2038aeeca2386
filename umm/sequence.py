"""Packing interleaved text/image segments into one batched sequence, and the attention rule.

A row of the batch is a list of segments. Each segment is a run of embedded tokens:

    text   [<|im_start|> w1 w2 ... <|im_end|>]        causal inside, RoPE positions p, p+1, ...
    image  [<|vision_start|> x1 ... xN <|vision_end|>]  full attention inside, ONE shared position p

Attention (BAGEL's rule, written as one predicate): query i in segment s_i may attend key j in
segment s_j iff key j is a real token (not padding) and
    s_j <  s_i  and segment s_j is not `hidden_from_later`     (earlier context), or
    s_j == s_i  and (segment is full, or j <= i)                (inside the segment).
`hidden_from_later` marks noised image latents during training: later tokens must see only clean
context, never the noisy target. Rows are right-padded; padding queries attend only to themselves
(so softmax is defined) and are ignored by every caller.

Everything here is pure tensor code: no model, no parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(kw_only=True)
class Segment:
    """A run of embedded tokens with its attention/position/expert behaviour."""
    embeds: Tensor                 # (n, hidden)
    gen: Tensor                    # (n,) bool: token goes through the generation expert
    full: bool                     # full attention inside the segment (images) vs causal (text)
    shared_position: bool          # every token gets the same RoPE position (images)
    hidden_from_later: bool = False  # later segments may not attend to it (noisy latents)

    def __post_init__(self) -> None:
        if self.embeds.dim() != 2 or self.gen.shape != self.embeds.shape[:1]:
            raise ValueError(f"Segment: embeds must be (n, hidden) and gen (n,), got "
                             f"{tuple(self.embeds.shape)} and {tuple(self.gen.shape)}")

    def __len__(self) -> int:
        return self.embeds.shape[0]


@dataclass(kw_only=True)
class Packed:
    """A right-padded batch of packed rows, ready for the decoder."""
    embeds: Tensor        # (B, L, hidden)
    position_ids: Tensor  # (B, L) long, RoPE positions
    gen_mask: Tensor      # (B, L) bool, generation-expert tokens
    valid: Tensor         # (B, L) bool, real tokens
    attn_mask: Tensor     # (B, L, L) bool, True = query may attend key
    segment_ids: Tensor   # (B, L) long, -1 on padding
    next_pos: Tensor      # (B,) long, first free RoPE position after each row
    spans: list[list[tuple[int, int]]]  # per row, per segment: [start, end) column range


def pack(rows: list[list[Segment]], *, start_pos: Tensor | None = None) -> Packed:
    """Pack rows of segments (rows may differ in length and structure) into one padded batch.

    `start_pos` (B,) is the first RoPE position of each row (the KV cache's `next_pos` when the
    rows continue a cached context; zeros otherwise).
    """
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("pack: every row needs at least one segment")
    B = len(rows)
    ref = rows[0][0].embeds
    hidden, device, dtype = ref.shape[-1], ref.device, ref.dtype
    lengths = [sum(len(s) for s in r) for r in rows]
    L = max(lengths)
    if start_pos is None:
        start_pos = torch.zeros(B, dtype=torch.long, device=device)
    embeds = torch.zeros(B, L, hidden, device=device, dtype=dtype)
    position_ids = torch.zeros(B, L, dtype=torch.long, device=device)
    gen_mask = torch.zeros(B, L, dtype=torch.bool, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    segment_ids = torch.full((B, L), -1, dtype=torch.long, device=device)
    full = torch.zeros(B, L, dtype=torch.bool, device=device)
    hidden_later = torch.zeros(B, L, dtype=torch.bool, device=device)
    next_pos = torch.empty(B, dtype=torch.long, device=device)
    spans: list[list[tuple[int, int]]] = []
    for b, row in enumerate(rows):
        col, pos = 0, int(start_pos[b])
        row_spans = []
        for s_idx, seg in enumerate(row):
            n = len(seg)
            if seg.embeds.shape[-1] != hidden:
                raise ValueError(f"pack: row {b} segment {s_idx} has hidden size {seg.embeds.shape[-1]}, "
                                 f"expected {hidden}")
            sl = slice(col, col + n)
            embeds[b, sl] = seg.embeds.to(dtype)
            gen_mask[b, sl] = seg.gen
            valid[b, sl] = True
            segment_ids[b, sl] = s_idx
            full[b, sl] = seg.full
            hidden_later[b, sl] = seg.hidden_from_later
            if seg.shared_position:
                position_ids[b, sl] = pos
                pos += 1
            else:
                position_ids[b, sl] = torch.arange(pos, pos + n, device=device)
                pos += n
            row_spans.append((col, col + n))
            col += n
        next_pos[b] = pos
        spans.append(row_spans)
    attn_mask = attention_rule(segment_ids, valid=valid, full=full, hidden_from_later=hidden_later)
    return Packed(embeds=embeds, position_ids=position_ids, gen_mask=gen_mask, valid=valid,
                  attn_mask=attn_mask, segment_ids=segment_ids, next_pos=next_pos, spans=spans)


def attention_rule(segment_ids: Tensor, *, valid: Tensor, full: Tensor, hidden_from_later: Tensor) -> Tensor:
    """(B, L, L) bool mask from per-token segment ids and flags; see the module docstring."""
    L = segment_ids.shape[1]
    s_q = segment_ids[:, :, None]
    s_k = segment_ids[:, None, :]
    idx = torch.arange(L, device=segment_ids.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    earlier = (s_k < s_q) & ~hidden_from_later[:, None, :]
    same = (s_k == s_q) & (full[:, :, None] | causal)
    mask = (earlier | same) & valid[:, None, :] & valid[:, :, None]
    # padding queries attend to themselves only, so no softmax row is empty
    eye = torch.eye(L, dtype=torch.bool, device=segment_ids.device)[None]
    return mask | (eye & ~valid[:, :, None])
