"""Corrupting a correct scene so that it no longer satisfies its meaning (judge negatives).

Kinds: wrong_colour (an object of a coloured spec gets another colour), wrong_count (one more object
of a spec, or one fewer when there is no room), swapped_relation (subject and object trade shape and
colour, so the relation reverses), missing_object (one object removed), extra_object (an object that
matches no spec is added). `corrupt` returns None when a kind does not apply to the meaning or the
canvas has no room; otherwise the returned scene violates the meaning by construction.
"""
from __future__ import annotations

import random

from shapes.layout import add_object
from shapes.meaning import Meaning
from shapes.scene import Scene
from shapes.world import COLOUR_NAMES, SHAPES

NEGATIVE_KINDS: tuple[str, ...] = ("wrong_colour", "wrong_count", "swapped_relation", "missing_object",
                                   "extra_object")


def _owners(scene: Scene, meaning: Meaning) -> list[int | None]:
    return [meaning.spec_index(o.shape, o.colour) for o in scene.objects]


def _without(scene: Scene, index: int) -> Scene:
    return scene.replace_objects(tuple(o for i, o in enumerate(scene.objects) if i != index))


def _wrong_colour(scene: Scene, meaning: Meaning, rng: random.Random) -> Scene | None:
    owners = _owners(scene, meaning)
    choices = [i for i, k in enumerate(owners) if k is not None and meaning.objects[k].colour is not None]
    if not choices:
        return None
    i = rng.choice(choices)
    colour = rng.choice([c for c in COLOUR_NAMES if c != scene.objects[i].colour])
    objects = list(scene.objects)
    objects[i] = objects[i].recoloured(colour)
    return scene.replace_objects(tuple(objects))


def _wrong_count(scene: Scene, meaning: Meaning, rng: random.Random) -> Scene | None:
    k = rng.randrange(len(meaning.objects))
    spec = meaning.objects[k]
    more = add_object(scene, shape=spec.shape, colour=spec.colour or rng.choice(COLOUR_NAMES), rng=rng)
    if more is not None:
        return more
    members = [i for i, o in enumerate(_owners(scene, meaning)) if o == k]
    return _without(scene, rng.choice(members)) if members else None


def _swapped_relation(scene: Scene, meaning: Meaning, rng: random.Random) -> Scene | None:
    rel = meaning.relation
    if rel is None:
        return None
    owners = _owners(scene, meaning)
    subj = [i for i, o in enumerate(owners) if o == rel.subject]
    obj = [i for i, o in enumerate(owners) if o == rel.object]
    if len(subj) != 1 or len(obj) != 1:
        return None
    a, b = scene.objects[subj[0]], scene.objects[obj[0]]
    objects = list(scene.objects)
    objects[subj[0]] = a.moved(cx=b.cx, cy=b.cy)
    objects[obj[0]] = b.moved(cx=a.cx, cy=a.cy)
    try:
        return scene.replace_objects(tuple(objects))
    except ValueError:       # a larger object moved too close to the edge
        return None


def _missing_object(scene: Scene, meaning: Meaning, rng: random.Random) -> Scene | None:
    members = [i for i, o in enumerate(_owners(scene, meaning)) if o is not None]
    return _without(scene, rng.choice(members)) if members else None


def _extra_object(scene: Scene, meaning: Meaning, rng: random.Random) -> Scene | None:
    free = [(s, c) for s in SHAPES for c in COLOUR_NAMES if meaning.spec_index(s, c) is None]
    if not free:
        return None
    shape, colour = rng.choice(free)
    return add_object(scene, shape=shape, colour=colour, rng=rng)


_CORRUPTORS = {"wrong_colour": _wrong_colour, "wrong_count": _wrong_count,
               "swapped_relation": _swapped_relation, "missing_object": _missing_object,
               "extra_object": _extra_object}


def corrupt(scene: Scene, meaning: Meaning, kind: str, rng: random.Random) -> Scene | None:
    """`scene` changed so that it violates `meaning` in the way `kind` names, or None."""
    if kind not in _CORRUPTORS:
        raise ValueError(f"corrupt: kind={kind!r} is not one of {NEGATIVE_KINDS}")
    return _CORRUPTORS[kind](scene, meaning, rng)
