"""Colour segmentation and connected components, from pixels alone (numpy only, no scipy).

Every pixel is explained as `white - alpha * ink(c)` for the palette colour `c` that fits it best,
where `ink(c) = 255 - rgb(c)`: an anti-aliased edge of a red square is a red/white mix and stays red
instead of looking orange. A pixel is labelled with colour `c` when it carries at least half of
`c`'s ink and lies within `MAX_RESIDUAL` of that mixing line; strongly inked pixels that fit no
colour's mixing line are `UNKNOWN`; the rest is background (including faint anti-aliased rims).
Components are 8-connected runs of one label.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from shapes.world import COLOURS, WHITE

PALETTE = np.array([COLOURS[c] for c in COLOURS], dtype=np.float64)     # (C, 3)
INK = np.array(WHITE, dtype=np.float64) - PALETTE                         # (C, 3)
BACKGROUND = -1
UNKNOWN = len(COLOURS)                  # label of ink that fits no palette colour
MIN_ALPHA = 0.5                         # a pixel belongs to an object from half coverage on
MAX_RESIDUAL = 48.0                     # px-value distance from a colour/white mixing line
UNKNOWN_INK = 100.0                     # |white - pixel| above which unexplained ink is "unknown"


@dataclass(frozen=True, kw_only=True)
class Segmentation:
    """Per-pixel analysis of one RGB image (H, W)."""
    labels: np.ndarray       # (H, W) int: BACKGROUND, a palette index 0..C-1, or UNKNOWN
    alpha: np.ndarray        # (H, W) ink coverage of the best-fitting colour, in [0, 1]
    residuals: np.ndarray    # (H, W, C) distance from each colour's mixing line
    ink: np.ndarray          # (H, W) |white - pixel|


@dataclass(frozen=True, kw_only=True)
class Component:
    """An 8-connected set of pixels sharing one label."""
    label: int
    ys: np.ndarray           # (n,) row of each pixel
    xs: np.ndarray           # (n,) column of each pixel

    @property
    def area(self) -> int:
        return int(self.ys.size)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), with x1/y1 exclusive."""
        return (int(self.xs.min()), int(self.ys.min()), int(self.xs.max()) + 1, int(self.ys.max()) + 1)


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB image as a (H, W, 3) float64 array; a ValueError names a wrong shape."""
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected (H, W, 3) RGB, got array of shape {arr.shape}")
    return arr.astype(np.float64)


def segment(image: Image.Image | np.ndarray) -> Segmentation:
    """Label every pixel with its palette colour, UNKNOWN ink, or BACKGROUND."""
    v = np.array(WHITE, dtype=np.float64) - to_array(image)                 # (H, W, 3) ink
    alphas = np.clip(v @ INK.T / (INK * INK).sum(1), 0.0, 1.0)              # (H, W, C)
    residuals = np.linalg.norm(v[:, :, None, :] - alphas[..., None] * INK, axis=-1)
    best = residuals.argmin(-1)
    alpha = np.take_along_axis(alphas, best[..., None], -1)[..., 0]
    res = np.take_along_axis(residuals, best[..., None], -1)[..., 0]
    ink = np.linalg.norm(v, axis=-1)
    labels = np.full(best.shape, BACKGROUND, dtype=np.int64)
    coloured = (alpha >= MIN_ALPHA) & (res <= MAX_RESIDUAL)
    labels[coloured] = best[coloured]
    labels[(res > MAX_RESIDUAL) & (ink >= UNKNOWN_INK)] = UNKNOWN
    return Segmentation(labels=labels, alpha=alpha, residuals=residuals, ink=ink)


_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def components(labels: np.ndarray) -> list[Component]:
    """8-connected components of equal non-background labels, in raster order of first pixel."""
    h, w = labels.shape
    seen = labels == BACKGROUND
    grid = labels.tolist()
    visited = seen.tolist()
    out = []
    for y0, x0 in zip(*np.nonzero(~seen)):
        if visited[y0][x0]:
            continue
        label = grid[y0][x0]
        visited[y0][x0] = True
        stack, ys, xs = [(int(y0), int(x0))], [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for dy, dx in _NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and not visited[ny][nx] and grid[ny][nx] == label:
                    visited[ny][nx] = True
                    stack.append((ny, nx))
        out.append(Component(label=label, ys=np.array(ys), xs=np.array(xs)))
    return out
