"""Edit instructions on a given scene: recolour, add, remove, move.

`make_edit(scene, rng)` picks a feasible edit and returns an `Edit`: the instruction ("make the
circle blue"), the target scene, and the target `Meaning`: every object of the target grouped by
shape and colour, the relation an add/move asks for, the source scene, and `preserve`, the target
objects that must stay where they were. Objects are referred to as "the circle" when their shape is
unique in the scene, else "the red circle" when shape and colour are; others are never referents.
The source scene never satisfies the target meaning (a count, colour, relation or position differs).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from shapes.layout import add_object, move_object
from shapes.meaning import Meaning, ObjectSpec, Relation, from_objects, noun_phrase
from shapes.relations import geneval_relations
from shapes.scene import Scene
from shapes.world import COLOUR_NAMES, RELATION_PHRASES, RELATIONS, SHAPES

EDIT_KINDS: tuple[str, ...] = ("recolour", "add", "remove", "move")
MAX_OBJECTS_FOR_ADD = 3

TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("make the {ref} {colour}", "change the colour of the {ref} to {colour}",
                 "paint the {ref} {colour}", "turn the {ref} {colour}"),
    "add": ("add {new} {rel} the {ref}", "put {new} {rel} the {ref}", "draw {new} {rel} the {ref}"),
    "add_anywhere": ("add {new}", "also draw {new}", "put {new} in the picture"),
    "remove": ("remove the {ref}", "delete the {ref}", "take away the {ref}", "erase the {ref}"),
    "move": ("move the {ref} {rel} the {ref2}", "put the {ref} {rel} the {ref2}",
             "place the {ref} {rel} the {ref2}"),
}


@dataclass(frozen=True, kw_only=True)
class Edit:
    """One edit of a scene."""
    kind: str                # one of EDIT_KINDS
    instruction: str         # the user's edit instruction
    source: Scene
    target: Scene
    meaning: Meaning         # target meaning (source, relation, preserve filled in)


def referent(scene: Scene, index: int) -> str | None:
    """'circle' or 'red circle' naming objects[index] uniquely in `scene`, or None."""
    obj = scene.objects[index]
    if sum(o.shape == obj.shape for o in scene.objects) == 1:
        return obj.shape
    if sum(o.shape == obj.shape and o.colour == obj.colour for o in scene.objects) == 1:
        return f"{obj.colour} {obj.shape}"
    return None


def _meaning(source: Scene, target: Scene, *, keep: list[int], relation: tuple[int, str, int] | None) -> Meaning:
    specs, owner = from_objects(target.objects)
    rel = None
    if relation is not None:
        a, r, b = relation
        rel = Relation(subject=owner[a], relation=r, object=owner[b])
    return Meaning(objects=specs, relation=rel, source=source,
                   preserve=tuple(target.objects[i] for i in keep))


def _recolour(scene: Scene, rng: random.Random) -> Edit | None:
    choices = [i for i in range(len(scene.objects)) if referent(scene, i)]
    if not choices:
        return None
    i = rng.choice(choices)
    ref = referent(scene, i)
    colour = rng.choice([c for c in COLOUR_NAMES if c != scene.objects[i].colour])
    objects = list(scene.objects)
    objects[i] = objects[i].recoloured(colour)
    target = scene.replace_objects(tuple(objects))
    text = rng.choice(TEMPLATES["recolour"]).format(ref=ref, colour=colour)
    return Edit(kind="recolour", instruction=text, source=scene, target=target,
                meaning=_meaning(scene, target, keep=list(range(len(objects))), relation=None))


def _add(scene: Scene, rng: random.Random) -> Edit | None:
    if len(scene.objects) > MAX_OBJECTS_FOR_ADD:
        return None
    present = {(o.shape, o.colour) for o in scene.objects}
    shape, colour = rng.choice([(s, c) for s in SHAPES for c in COLOUR_NAMES if (s, c) not in present])
    new = noun_phrase(ObjectSpec(shape=shape, colour=colour))
    anchors = [i for i in range(len(scene.objects)) if referent(scene, i)]
    keep = list(range(len(scene.objects)))
    if anchors and rng.random() < 0.75:
        anchor, rel = rng.choice(anchors), rng.choice(RELATIONS)
        target = add_object(scene, shape=shape, colour=colour, rng=rng, relation=rel, anchor=anchor)
        if target is None:
            return None
        text = rng.choice(TEMPLATES["add"]).format(new=new, rel=RELATION_PHRASES[rel],
                                                   ref=referent(scene, anchor))
        relation = (len(scene.objects), rel, anchor)
    else:
        target = add_object(scene, shape=shape, colour=colour, rng=rng)
        if target is None:
            return None
        text, relation = rng.choice(TEMPLATES["add_anywhere"]).format(new=new), None
    return Edit(kind="add", instruction=text, source=scene, target=target,
                meaning=_meaning(scene, target, keep=keep, relation=relation))


def _remove(scene: Scene, rng: random.Random) -> Edit | None:
    choices = [i for i in range(len(scene.objects)) if referent(scene, i)]
    if len(scene.objects) < 2 or not choices:
        return None
    i = rng.choice(choices)
    target = scene.replace_objects(tuple(o for k, o in enumerate(scene.objects) if k != i))
    text = rng.choice(TEMPLATES["remove"]).format(ref=referent(scene, i))
    return Edit(kind="remove", instruction=text, source=scene, target=target,
                meaning=_meaning(scene, target, keep=list(range(len(target.objects))), relation=None))


def _move(scene: Scene, rng: random.Random) -> Edit | None:
    named = [i for i in range(len(scene.objects)) if referent(scene, i)]
    pairs = [(a, b) for a in named for b in named if a != b]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    now = geneval_relations(scene.objects[a].bbox, scene.objects[b].bbox)
    rels = [r for r in RELATIONS if r not in now]
    rel = rng.choice(rels)
    target = move_object(scene, a, relation=rel, anchor=b, rng=rng)
    if target is None:
        return None
    text = rng.choice(TEMPLATES["move"]).format(ref=referent(scene, a), rel=RELATION_PHRASES[rel],
                                                ref2=referent(scene, b))
    keep = [k for k in range(len(scene.objects)) if k != a]
    return Edit(kind="move", instruction=text, source=scene, target=target,
                meaning=_meaning(scene, target, keep=keep, relation=(a, rel, b)))


_MAKERS = {"recolour": _recolour, "add": _add, "remove": _remove, "move": _move}


def make_edit(scene: Scene, rng: random.Random, *, kinds: tuple[str, ...] = EDIT_KINDS) -> Edit:
    """A random feasible edit of `scene` among `kinds`; RuntimeError when none is feasible."""
    for kind in kinds:
        if kind not in _MAKERS:
            raise ValueError(f"make_edit: kind={kind!r} is not one of {EDIT_KINDS}")
    order = list(kinds)
    rng.shuffle(order)
    for kind in order:
        edit = _MAKERS[kind](scene, rng)
        if edit is not None:
            return edit
    raise RuntimeError(f"make_edit: no feasible edit of kinds {kinds} for a scene with "
                       f"{len(scene.objects)} objects")
