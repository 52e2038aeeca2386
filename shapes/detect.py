"""Objects from pixels: segmentation -> components -> shape and colour with soft probabilities.

Shape: the component's mask is compared (IoU) with each world shape drawn ideally into the
component's own bounding box (circle inscribed, square filling it, triangle apex up). A box far from
square (aspect < 0.8) lowers every score, so two touching same-coloured objects do not pass for one.
Shape probabilities are a softmax of IoU / SHAPE_TAU over the shapes plus an "other" option scored
OTHER_IOU. Colour: each palette colour's ink-weighted mean distance from its mixing line over the
component, turned into probabilities by a Gaussian (COLOUR_SIGMA) with an "other" option at
OTHER_RESIDUAL. Components below `world.speck_area` are stray blobs, not objects; so is ink that
touches all four edges of the canvas (a filled or tinted background, never a drawn object: a grey
canvas would otherwise pass for one canvas-sized square).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from shapes.segment import Component, Segmentation, components, segment
from shapes.world import COLOUR_NAMES, SHAPES, speck_area

OTHER = "other"
SHAPE_TAU = 0.03
OTHER_IOU = 0.62
COLOUR_SIGMA = 15.0
OTHER_RESIDUAL = 50.0


@dataclass(frozen=True, kw_only=True)
class Detection:
    """One object found in an image."""
    shape: str | None                    # most probable world shape; None when "other" wins
    colour: str | None                   # most probable palette colour; None when "other" wins
    center: tuple[float, float]          # bounding-box centre (x, y), px; used for relations
    centroid: tuple[float, float]        # mean pixel position (x, y), px
    area: int                            # pixels
    bbox: tuple[int, int, int, int]      # (x0, y0, x1, y1), x1/y1 exclusive
    confidence: float                    # p(shape) * p(colour) of the winners
    shape_probs: dict[str, float]        # over SHAPES + "other"
    colour_probs: dict[str, float]       # over COLOURS + "other"


@dataclass(frozen=True, kw_only=True)
class Analysis:
    """Everything `analyse` found: objects, stray blobs, and the pixel segmentation."""
    detections: tuple[Detection, ...]
    stray_blobs: int                     # components smaller than world.speck_area
    stray_area: int                      # their pixels
    object_mask: np.ndarray              # (H, W) bool: pixels of the detected objects
    segmentation: Segmentation


@lru_cache(maxsize=4096)
def template(shape: str, h: int, w: int) -> np.ndarray:
    """Ideal (h, w) mask of `shape` filling its box, sampled at pixel centres (read-only)."""
    y = (np.arange(h)[:, None] + 0.5) / h           # 0..1 top to bottom
    x = (np.arange(w)[None, :] + 0.5) / w
    if shape == "circle":
        mask = (2 * x - 1) ** 2 + (2 * y - 1) ** 2 <= 1.0
    elif shape == "square":
        mask = np.ones((h, w), dtype=bool)
    elif shape == "triangle":
        mask = np.abs(x - 0.5) <= y / 2
    else:
        raise ValueError(f"template: unknown shape {shape!r} (known: {SHAPES})")
    mask = np.broadcast_to(mask, (h, w)).copy()
    mask.flags.writeable = False
    return mask


def _softmax(scores: dict[str, float], scale: float) -> dict[str, float]:
    top = max(scores.values())
    e = {k: float(np.exp((s - top) / scale)) for k, s in scores.items()}
    z = sum(e.values())
    return {k: v / z for k, v in e.items()}


def shape_probs(comp: Component) -> dict[str, float]:
    """Probabilities over SHAPES + "other" from template IoUs in the component's box."""
    x0, y0, x1, y1 = comp.bbox
    h, w = y1 - y0, x1 - x0
    mask = np.zeros((h, w), dtype=bool)
    mask[comp.ys - y0, comp.xs - x0] = True
    squareness = float(np.clip((min(h, w) / max(h, w) - 0.5) / 0.3, 0.0, 1.0))
    scores = {}
    for shape in SHAPES:
        t = template(shape, h, w)
        scores[shape] = squareness * (mask & t).sum() / (mask | t).sum()
    scores[OTHER] = OTHER_IOU
    return _softmax(scores, SHAPE_TAU)


def colour_probs(comp: Component, seg: Segmentation) -> dict[str, float]:
    """Probabilities over COLOURS + "other" from ink-weighted distances to each mixing line."""
    weights = seg.ink[comp.ys, comp.xs]
    res = seg.residuals[comp.ys, comp.xs]                               # (n, C)
    mean_res = (weights[:, None] * res).sum(0) / max(float(weights.sum()), 1e-9)
    logits = {c: -float(r) ** 2 for c, r in zip(COLOUR_NAMES, mean_res)}
    logits[OTHER] = -OTHER_RESIDUAL ** 2
    return _softmax(logits, 2 * COLOUR_SIGMA ** 2)


def _detection(comp: Component, seg: Segmentation) -> Detection:
    sp, cp = shape_probs(comp), colour_probs(comp, seg)
    shape, colour = max(sp, key=sp.get), max(cp, key=cp.get)
    x0, y0, x1, y1 = comp.bbox
    return Detection(
        shape=None if shape == OTHER else shape,
        colour=None if colour == OTHER else colour,
        center=((x0 + x1) / 2, (y0 + y1) / 2),
        centroid=(float(comp.xs.mean()) + 0.5, float(comp.ys.mean()) + 0.5),
        area=comp.area, bbox=comp.bbox, confidence=sp[shape] * cp[colour],
        shape_probs=sp, colour_probs=cp)


def analyse(image: Image.Image | np.ndarray) -> Analysis:
    """Segment `image`, split it into components, keep objects, count stray blobs."""
    seg = segment(image)
    min_area = speck_area(max(seg.labels.shape))
    found, strays, stray_area = [], 0, 0
    mask = np.zeros(seg.labels.shape, dtype=bool)
    height, width = seg.labels.shape
    for comp in components(seg.labels):
        if comp.area < min_area or comp.bbox == (0, 0, width, height):
            strays += 1
            stray_area += comp.area
        else:
            found.append(_detection(comp, seg))
            mask[comp.ys, comp.xs] = True
    return Analysis(detections=tuple(found), stray_blobs=strays, stray_area=stray_area,
                    object_mask=mask, segmentation=seg)



def detect(image: Image.Image | np.ndarray) -> list[Detection]:
    """The objects in `image` (stray blobs dropped), in raster order of their first pixel."""
    return list(analyse(image).detections)
