"""Placing objects on the canvas: no overlaps, margins to the edges, unambiguous relations.

All placement goes through `_try_place`, which proposes integer-aligned bounding boxes (so squares
have crisp edges) and accepts one only if it keeps `object_gap` px from every other box and
`border_margin` px from the edges. A relation is placed *clearly*: along its axis the centres are at
least the half-sizes plus the gap apart, and across it they differ by at most 0.35x that offset, so
"left of" by box centres is never a judgement call (GenEval's rule gives >= 0.74 along the axis).
"""
from __future__ import annotations

import random

from shapes.meaning import Meaning
from shapes.scene import Object, Scene
from shapes.world import COLOUR_NAMES, INVERSE_RELATION, border_margin, object_gap, size_range

PERP_RATIO = 0.35
"""Largest |cross-axis offset| / along-axis offset of a placed relation."""

_AXIS = {"left_of": (-1, 0), "right_of": (1, 0), "above": (0, -1), "below": (0, 1)}


def apart(a: Object, b: Object, gap: float) -> bool:
    """Are the two bounding boxes separated by at least `gap` px along x or y?"""
    half = (a.size + b.size) / 2 + gap
    return abs(a.cx - b.cx) >= half or abs(a.cy - b.cy) >= half


def clearly(a: Object, relation: str, b: Object, gap: float) -> bool:
    """Is `a` clearly `relation` of `b` (layout's margin, stricter than the judge's rule)?"""
    sx, sy = _AXIS[relation]
    along = (a.cx - b.cx) * sx + (a.cy - b.cy) * sy
    across = abs((a.cx - b.cx) * sy) + abs((a.cy - b.cy) * sx)
    return along >= (a.size + b.size) / 2 + gap and across <= PERP_RATIO * along


def _inside(obj: Object, canvas_size: int) -> bool:
    m = border_margin(canvas_size)
    x0, y0, x1, y1 = obj.bbox
    return x0 >= m and y0 >= m and x1 <= canvas_size - m and y1 <= canvas_size - m


def _propose(shape: str, colour: str, size: int, canvas_size: int, rng: random.Random,
             anchor: Object | None, relation: str | None) -> Object:
    m = border_margin(canvas_size)
    if anchor is None or relation is None:
        x0 = rng.randint(m, canvas_size - m - size)
        y0 = rng.randint(m, canvas_size - m - size)
        return Object(shape=shape, colour=colour, cx=x0 + size / 2, cy=y0 + size / 2, size=size)
    sx, sy = _AXIS[relation]
    along = (size + anchor.size) / 2 + object_gap(canvas_size) + rng.uniform(0, canvas_size / 3)
    across = rng.uniform(-PERP_RATIO, PERP_RATIO) * along
    cx = anchor.cx + sx * along + sy * across
    cy = anchor.cy + sy * along + sx * across
    # snap the box corner to the pixel grid
    x0, y0 = round(cx - size / 2), round(cy - size / 2)
    return Object(shape=shape, colour=colour, cx=x0 + size / 2, cy=y0 + size / 2, size=size)


def _try_place(scene_objects: list[Object], shape: str, colour: str, size: int, canvas_size: int,
               rng: random.Random, *, anchor: Object | None = None, relation: str | None = None,
               tries: int = 60) -> Object | None:
    gap = object_gap(canvas_size)
    for _ in range(tries):
        obj = _propose(shape, colour, size, canvas_size, rng, anchor, relation)
        if not _inside(obj, canvas_size):
            continue
        if anchor is not None and relation is not None and not clearly(obj, relation, anchor, gap):
            continue
        if all(apart(obj, other, gap) for other in scene_objects):
            return obj
    return None


def _colours_for(meaning: Meaning, rng: random.Random) -> list[list[str]]:
    """Per spec, one colour per object; a colourless spec shares one colour half of the time."""
    out = []
    for spec in meaning.objects:
        if spec.colour is not None:
            out.append([spec.colour] * spec.count)
        elif rng.random() < 0.5:
            out.append([rng.choice(COLOUR_NAMES)] * spec.count)
        else:
            out.append([rng.choice(COLOUR_NAMES) for _ in range(spec.count)])
    return out


def sample_scene(meaning: Meaning, rng: random.Random, *, canvas_size: int, attempts: int = 200) -> Scene:
    """A scene with exactly the objects `meaning` asks for, its relation placed clearly.

    Colourless specs get random palette colours. An edit meaning (with `preserve`) keeps the
    preserved objects where they are and places the rest (`_complete`). Raises RuntimeError naming
    the meaning when no layout is found (e.g. too many objects for the canvas)."""
    if meaning.preserve:
        return _complete(meaning, rng, canvas_size=canvas_size, attempts=attempts)
    rel = meaning.relation
    if rel is not None and (meaning.objects[rel.subject].count != 1 or meaning.objects[rel.object].count != 1):
        raise ValueError(f"sample_scene: relation {rel} needs single objects on both sides")
    lo, hi = size_range(canvas_size)
    order = list(range(len(meaning.objects)))
    if rel is not None:  # place the relation's object first, then its subject next to it
        order = [rel.object, rel.subject] + [i for i in order if i not in (rel.object, rel.subject)]
    for attempt in range(attempts):
        colours = _colours_for(meaning, rng)
        top = hi - (hi - lo) * min(1.0, attempt / (attempts / 2))   # shrink when crowded
        placed: dict[tuple[int, int], Object] = {}
        ok = True
        for i in order:
            spec = meaning.objects[i]
            for k in range(spec.count):
                size = rng.randint(lo, max(lo, int(top)))
                anchor = placed.get((rel.object, 0)) if rel is not None and i == rel.subject else None
                obj = _try_place(list(placed.values()), spec.shape, colours[i][k], size, canvas_size,
                                 rng, anchor=anchor, relation=rel.relation if anchor else None)
                if obj is None:
                    ok = False
                    break
                placed[(i, k)] = obj
            if not ok:
                break
        if ok:
            objects = tuple(placed[(i, k)] for i in range(len(meaning.objects))
                            for k in range(meaning.objects[i].count))
            return Scene(canvas_size=canvas_size, objects=objects)
    raise RuntimeError(f"sample_scene: no layout for {meaning.objects} on a {canvas_size}px canvas")


def add_object(scene: Scene, *, shape: str, colour: str, rng: random.Random, size: int | None = None,
               relation: str | None = None, anchor: int | None = None) -> Scene | None:
    """`scene` plus one new object (appended), optionally clearly `relation` of objects[anchor].

    Returns None when there is no room, so callers can choose another edit."""
    if (relation is None) != (anchor is None):
        raise ValueError("add_object: give both relation and anchor, or neither")
    lo, hi = size_range(scene.canvas_size)
    for _ in range(8):
        s = size if size is not None else rng.randint(lo, hi)
        obj = _try_place(list(scene.objects), shape, colour, s, scene.canvas_size, rng,
                         anchor=scene.objects[anchor] if anchor is not None else None, relation=relation)
        if obj is not None:
            return scene.replace_objects(scene.objects + (obj,))
    return None


def move_object(scene: Scene, index: int, *, relation: str, anchor: int, rng: random.Random) -> Scene | None:
    """`scene` with objects[index] moved to be clearly `relation` of objects[anchor] (order kept)."""
    if index == anchor:
        raise ValueError(f"move_object: index and anchor are both {index}")
    moving = scene.objects[index]
    others = [o for i, o in enumerate(scene.objects) if i != index]
    obj = _try_place(others, moving.shape, moving.colour, moving.size, scene.canvas_size, rng,
                     anchor=scene.objects[anchor], relation=relation, tries=200)
    if obj is None:
        return None
    objects = list(scene.objects)
    objects[index] = obj
    return scene.replace_objects(tuple(objects))


def _complete(meaning: Meaning, rng: random.Random, *, canvas_size: int, attempts: int) -> Scene:
    """The preserved objects plus whatever else the specs ask for (an edit's reference target)."""
    if meaning.source is not None and meaning.source.canvas_size != canvas_size:
        raise ValueError(f"sample_scene: canvas_size={canvas_size} but the edit's source scene is "
                         f"{meaning.source.canvas_size}px")
    base = Scene(canvas_size=canvas_size, objects=meaning.preserve)
    kept = [meaning.spec_index(o.shape, o.colour) for o in base.objects]
    rel = meaning.relation
    for _ in range(attempts):
        scene = base
        for i, spec in enumerate(meaning.objects):
            for _ in range(spec.count - kept.count(i)):
                how: dict = {}
                if rel is not None and i in (rel.subject, rel.object):
                    other = rel.object if i == rel.subject else rel.subject
                    anchors = [k for k, o in enumerate(scene.objects)
                               if meaning.spec_index(o.shape, o.colour) == other]
                    if anchors:
                        how = {"anchor": anchors[0], "relation": rel.relation if i == rel.subject
                               else INVERSE_RELATION[rel.relation]}
                nxt = add_object(scene, shape=spec.shape, colour=spec.colour or rng.choice(COLOUR_NAMES),
                                 rng=rng, **how)
                if nxt is None:
                    break
                scene = nxt
        if all(sum(meaning.spec_index(o.shape, o.colour) == i for o in scene.objects) == spec.count
               for i, spec in enumerate(meaning.objects)):
            return scene
    raise RuntimeError(f"sample_scene: cannot complete the preserved objects to {meaning.objects} "
                       f"on a {canvas_size}px canvas")
