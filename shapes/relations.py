"""Spatial relations between two bounding boxes: GenEval's hard rule and a soft version of it.

GenEval (`relative_position`): take the centre offset of A from B, shrink each axis by 0.1x the
summed box sizes, divide by the offset's length; A is left of B when the x component is < -0.5,
above when the y component is < -0.5 (image y grows downwards), and so on.
"""
from __future__ import annotations

import math

POSITION_THRESHOLD = 0.1
SOFT_TEMPERATURE = 0.05

Box = tuple[float, float, float, float]      # (x0, y0, x1, y1)


def _directions(a: Box, b: Box) -> tuple[float, float] | None:
    off = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2, (a[1] + a[3]) / 2 - (b[1] + b[3]) / 2)
    dims = (a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1])
    revised = [max(abs(o) - POSITION_THRESHOLD * d, 0.0) * math.copysign(1.0, o) for o, d in zip(off, dims)]
    if all(abs(r) < 1e-3 for r in revised):
        return None
    norm = math.hypot(*off)
    return revised[0] / norm, revised[1] / norm


_SIGN = {"left_of": (0, -1.0), "right_of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}


def geneval_relations(a: Box, b: Box) -> set[str]:
    """The relations of box `a` to box `b`: a subset of {left_of, right_of, above, below}."""
    d = _directions(a, b)
    if d is None:
        return set()
    return {rel for rel, (axis, sign) in _SIGN.items() if sign * d[axis] > 0.5}


def relation_prob(a: Box, relation: str, b: Box) -> float:
    """Soft GenEval rule: sigmoid((component along `relation` - 0.5) / SOFT_TEMPERATURE)."""
    if relation not in _SIGN:
        raise ValueError(f"relation={relation!r}: not one of {tuple(_SIGN)}")
    d = _directions(a, b)
    if d is None:
        return 0.0
    axis, sign = _SIGN[relation]
    z = (sign * d[axis] - 0.5) / SOFT_TEMPERATURE
    return 1.0 / (1.0 + math.exp(-z)) if z > -50 else 0.0
