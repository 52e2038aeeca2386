"""Scenes of the shapes world and their deterministic renderer.

An `Object` is a shape of one palette colour whose axis-aligned bounding box is
`[cx - size/2, cx + size/2] x [cy - size/2, cy + size/2]` in continuous pixel coordinates (pixel
`i` spans `[i, i + 1]`). Circles are inscribed in that box, squares fill it, and triangles point up
with their base on its bottom edge. `render` draws at `SUPERSAMPLE`x on a plain background and
box-filters down, so edges are mildly anti-aliased and every byte is a function of the scene alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from shapes.world import COLOURS, SHAPES, SUPERSAMPLE, WHITE, check_canvas_size


@dataclass(frozen=True, kw_only=True)
class Object:
    """One drawn object."""
    shape: str                      # one of world.SHAPES
    colour: str                     # one of world.COLOURS
    cx: float                       # bounding-box centre, px from the left edge
    cy: float                       # bounding-box centre, px from the top edge
    size: int                       # side of the (square) bounding box, px

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"Object.shape={self.shape!r}: not one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"Object.colour={self.colour!r}: not one of {tuple(COLOURS)}")
        if self.size < 1:
            raise ValueError(f"Object.size={self.size!r}: must be >= 1 px")

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in continuous pixel coordinates."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def moved(self, *, cx: float, cy: float) -> "Object":
        return Object(shape=self.shape, colour=self.colour, cx=cx, cy=cy, size=self.size)

    def recoloured(self, colour: str) -> "Object":
        return Object(shape=self.shape, colour=colour, cx=self.cx, cy=self.cy, size=self.size)


@dataclass(frozen=True, kw_only=True)
class Scene:
    """A canvas and the objects on it (drawn in order; layouts never let them overlap)."""
    canvas_size: int                                   # side of the square RGB canvas, px
    objects: tuple[Object, ...] = ()
    background: tuple[int, int, int] = field(default=WHITE)

    def __post_init__(self) -> None:
        check_canvas_size(self.canvas_size)
        object.__setattr__(self, "objects", tuple(self.objects))
        for i, obj in enumerate(self.objects):
            x0, y0, x1, y1 = obj.bbox
            if x0 < 0 or y0 < 0 or x1 > self.canvas_size or y1 > self.canvas_size:
                raise ValueError(f"Scene.objects[{i}] ({obj.colour} {obj.shape}) bbox {obj.bbox} "
                                 f"leaves the {self.canvas_size}px canvas")

    def replace_objects(self, objects: tuple[Object, ...]) -> "Scene":
        return Scene(canvas_size=self.canvas_size, objects=tuple(objects), background=self.background)


def _draw(draw: ImageDraw.ImageDraw, obj: Object, scale: int) -> None:
    x0, y0, x1, y1 = (round(v * scale) for v in obj.bbox)
    fill = COLOURS[obj.colour]
    # PIL boxes are pixel-inclusive: the last covered supersampled pixel is x1 - 1.
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:  # unreachable: Object validates its shape
        raise ValueError(f"cannot draw shape {obj.shape!r}")


def render(scene: Scene) -> Image.Image:
    """Draw `scene` as an RGB image of `scene.canvas_size` px; same scene -> identical bytes."""
    big = scene.canvas_size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw(draw, obj, SUPERSAMPLE)
    return image.resize((scene.canvas_size, scene.canvas_size), Image.Resampling.BOX)
