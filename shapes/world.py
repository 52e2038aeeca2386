"""The vocabulary of the embedded shapes world: shapes, colours, sizes, relations, numbers.

Everything else in `shapes/` draws its words and its geometry from here, so the tokenizer, the
renderer and the judge agree by construction. Geometry is expressed relative to the canvas side
so every canvas size in `SUPPORTED_CANVAS_SIZES` works with the same code.
"""
from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""World shapes. Triangles point up and are as wide as they are tall. A fourth shape (diamond,
star) was left out: at 32 px a 7-px diamond and a 7-px triangle share fill ratio ~0.5 and the
judge's margin between them is thin."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
"""Palette (RGB). Chosen so that their *ink directions* (255 - rgb) differ: the judge unmixes
anti-aliased edge pixels as `alpha * colour + (1 - alpha) * white`."""

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
WHITE: tuple[int, int, int] = (255, 255, 255)

RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")
RELATION_PHRASES: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}
INVERSE_RELATION: dict[str, str] = {
    "left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above",
}

NUMBER_WORDS: dict[int, str] = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
MAX_COUNT = 4
"""Counting prompts ask for 1..MAX_COUNT objects (GenEval counts 2..4; we add one)."""

SUPPORTED_CANVAS_SIZES: tuple[int, ...] = (32, 48, 64)
DEFAULT_CANVAS_SIZE = 32
"""Provisional default (the calibration run used 32); every function takes `canvas_size`."""

SUPERSAMPLE = 4
"""Render at 4x and box-filter down: mild, deterministic anti-aliasing."""


def check_canvas_size(canvas_size: int) -> int:
    """Return `canvas_size` or raise a ValueError naming it when it is not supported."""
    if canvas_size not in SUPPORTED_CANVAS_SIZES:
        raise ValueError(f"canvas_size={canvas_size!r}: supported sizes are {SUPPORTED_CANVAS_SIZES}")
    return canvas_size


def size_range(canvas_size: int) -> tuple[int, int]:
    """Smallest and largest object side (px, inclusive): 7..11 px at 32, 14..22 px at 64."""
    check_canvas_size(canvas_size)
    return round(0.22 * canvas_size), round(0.34 * canvas_size)


def border_margin(canvas_size: int) -> int:
    """Free pixels kept between any object and the canvas edge."""
    return max(1, canvas_size // 32)


def object_gap(canvas_size: int) -> int:
    """Free pixels kept between the bounding boxes of any two objects."""
    return max(2, canvas_size // 16)


def speck_area(canvas_size: int) -> int:
    """Components smaller than this (px) are stray blobs, not objects (smallest object: ~24 px at 32)."""
    return max(4, round(0.006 * canvas_size * canvas_size))


def plural(shape: str) -> str:
    """'circle' -> 'circles' (all world shapes take a plain -s)."""
    return shape + "s"


def article(word: str) -> str:
    """'a' or 'an' for the word that follows ('an orange circle')."""
    return "an" if word[:1] in "aeiou" else "a"


def number_word(n: int) -> str:
    """0..5 as a word; a ValueError names `n` otherwise."""
    if n not in NUMBER_WORDS:
        raise ValueError(f"n={n!r}: no number word (known: {sorted(NUMBER_WORDS)})")
    return NUMBER_WORDS[n]
