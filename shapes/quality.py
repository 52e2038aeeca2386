"""Measurable image-quality properties for the shapes world, each a score in [0, 1].

  clean_edges       fraction of inked pixels (|white - pixel| >= INKED) that are a mix of one
                    palette colour and white (residual <= CLEAN_RESIDUAL): no muddy or off-palette ink
  plain_background  fraction of background pixels (farther than 1 px from every detected object)
                    that are near-white (|white - pixel| <= NEAR_WHITE)
  no_stray_blobs    1 / (1 + number of components smaller than world.speck_area)
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from shapes.detect import analyse

INKED = 20.0
CLEAN_RESIDUAL = 24.0
NEAR_WHITE = 12.0
QUALITY_KEYS: tuple[str, ...] = ("clean_edges", "plain_background", "no_stray_blobs")


def _dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbour dilation by one pixel."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def quality(image: Image.Image | np.ndarray) -> dict[str, float]:
    """The three quality scores of `image` (keys: QUALITY_KEYS)."""
    analysis = analyse(image)
    seg = analysis.segmentation
    inked = seg.ink >= INKED
    clean = seg.residuals.min(-1) <= CLEAN_RESIDUAL
    clean_edges = float((inked & clean).sum() / inked.sum()) if inked.any() else 1.0
    background = ~_dilate(analysis.object_mask)
    plain = float((background & (seg.ink <= NEAR_WHITE)).sum() / background.sum()) if background.any() else 1.0
    return {"clean_edges": clean_edges, "plain_background": plain,
            "no_stray_blobs": 1.0 / (1.0 + analysis.stray_blobs)}
