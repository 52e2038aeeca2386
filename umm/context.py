"""Contexts: what the model has read before it writes, and BAGEL's classifier-free-guidance variants.

A context is a list of items:
    Text(ids)    -> [<|im_start|> ids <|im_end|>]                       (understanding expert)
    Image(px)    -> clean VAE latent block (t = 0, generation expert)
                    then a SigLIP block (understanding expert), as BAGEL feeds an input image

CFG contexts for drawing (BAGEL's construction, batch rows aligned):
    full      = prefix + [text] + [think]   the policy's real context
    no_text   = prefix                      text-CFG: drops the latest text (and the think that
                                            follows it); for a thinking T2I prefix = [system prompt]
    no_image  = prefix texts + [text]       image-CFG: every image dropped (edits only)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from umm.model import UnifiedModel
from umm.mot import KVCache
from umm.sequence import Segment


@dataclass(frozen=True, kw_only=True)
class Text:
    ids: tuple[int, ...]


@dataclass(frozen=True, kw_only=True, eq=False)
class Image:
    pixels: Tensor          # (3, H, W) in [-1, 1]
    vae: bool = True        # feed the clean latent (needed to edit it)
    vit: bool = True        # feed SigLIP tokens (needed to understand it)


Item = Text | Image


def item_segments(model: UnifiedModel, item: Item) -> list[Segment]:
    tok = model.cfg.tokens
    if isinstance(item, Text):
        return [model.text_segment([tok.bos, *item.ids, tok.eos])]
    if isinstance(item, Image):
        segs = []
        if item.vae:
            tokens, hw = model.image_to_tokens(item.pixels[None])
            segs.append(model.latent_segment(tokens[0], t=0.0, hw=hw))
        if item.vit:
            segs.append(model.vit_segment(item.pixels))
        if not segs:
            raise ValueError("Image item with vae=False and vit=False feeds nothing")
        return segs
    raise TypeError(f"context item must be Text or Image, got {type(item).__name__}")


def encode_context(model: UnifiedModel, rows: list[list[Item]]) -> KVCache:
    """Encode one context per row into a KV cache. An empty row is allowed (unconditional)."""
    segs = [[s for it in row for s in item_segments(model, it)] for row in rows]
    if all(len(r) == 0 for r in segs):
        cfg = model.cfg.llm
        return KVCache.empty(len(rows), num_layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                             head_dim=cfg.head_dim, device=model.vae2llm.weight.device, dtype=model._dtype)
    if any(len(r) == 0 for r in segs):
        # ragged mix of empty and non-empty rows: pad the empty ones with one masked-out token
        raise ValueError("encode_context: mix of empty and non-empty rows; encode them separately")
    return model.encode(segs)


@dataclass(kw_only=True)
class DrawPrompt:
    """What one image is drawn from: prefix (system prompt, input image), the user text, the plan."""
    prefix: list[Item] = field(default_factory=list)
    text: Text
    think: Text | None = None

    def full(self) -> list[Item]:
        return [*self.prefix, self.text, *([self.think] if self.think is not None else [])]

    def no_text(self) -> list[Item]:
        return list(self.prefix)

    def no_image(self) -> list[Item]:
        return [i for i in self.prefix if isinstance(i, Text)] + [self.text]

    @property
    def has_image(self) -> bool:
        return any(isinstance(i, Image) for i in self.prefix)


@dataclass(kw_only=True)
class GuidanceContexts:
    """Encoded contexts for one batch of drawings; absent branches are None."""
    full: KVCache
    no_text: KVCache | None = None
    no_image: KVCache | None = None

    def select(self, index: Tensor) -> "GuidanceContexts":
        pick = lambda c: None if c is None else c.select(index)  # noqa: E731
        return GuidanceContexts(full=self.full.select(index), no_text=pick(self.no_text),
                                no_image=pick(self.no_image))

    def repeat_interleave(self, n: int) -> "GuidanceContexts":
        return self.select(torch.arange(self.full.batch_size, device=self.full.valid.device).repeat_interleave(n))


def encode_guidance(model: UnifiedModel, prompts: list[DrawPrompt], *, text_cfg: bool,
                    image_cfg: bool) -> GuidanceContexts:
    """Encode the full context and the CFG branches that are switched on."""
    no_text = encode_context(model, [p.no_text() for p in prompts]) if text_cfg else None
    no_image = None
    if image_cfg:
        if not all(p.has_image for p in prompts):
            raise ValueError("image CFG needs an input image in every prompt's prefix")
        no_image = encode_context(model, [p.no_image() for p in prompts])
    return GuidanceContexts(full=encode_context(model, [p.full() for p in prompts]),
                            no_text=no_text, no_image=no_image)
