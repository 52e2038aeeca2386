"""What a written plan says, read back over the world's closed vocabulary: is the plan right?

    parse_plan("<think> two red squares to the left of a circle </think>")
        -> PlanReading(objects=((2, "red", "square"), (1, None, "circle")),
                       relation=("left_of", "square", "circle"))
    plan_is_right(plan, meaning): every object the prompt asks for is in the plan with its count (and
        its colour when the prompt fixes one: for implicit colour, the fact's colour), and the
        relation when the prompt has one

It tells where a failure comes from (issue 19): a wrong plan (the text side did not resolve the
request), or a right plan the drawing did not follow (the image side). Analysis only: never a reward.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shapes.meaning import Meaning
from shapes.world import COLOUR_NAMES, INVERSE_RELATION, NUMBER_WORDS, RELATION_PHRASES, SHAPES, plural

_COUNT_WORDS = {w: n for n, w in NUMBER_WORDS.items()} | {"a": 1, "an": 1, "one": 1}
_NOUNS = {s: s for s in SHAPES} | {plural(s): s for s in SHAPES}


@dataclass(frozen=True, kw_only=True)
class PlanReading:
    objects: tuple[tuple[int, str | None, str], ...]   # (count, colour or None, shape), in plan order
    relation: tuple[str, str, str] | None               # (RELATIONS key, shape before it, shape after it)


def parse_plan(text: str) -> PlanReading:
    """The noun phrases ([count] [colour] shape) and the first relation phrase of a plan."""
    words = re.findall(r"[a-z]+|\d", text.lower())
    objects, where, i = [], [], 0
    while i < len(words):
        if words[i] in _NOUNS:
            where.append(i)
            colour = words[i - 1] if i >= 1 and words[i - 1] in COLOUR_NAMES else None
            j = i - (2 if colour else 1)
            count = 1
            if j >= 0 and words[j] in _COUNT_WORDS:
                count = _COUNT_WORDS[words[j]]
            elif j >= 0 and words[j].isdigit():
                count = int(words[j])
            objects.append((count, colour, _NOUNS[words[i]]))
        i += 1
    relation = None
    for start in range(len(words)):          # the first relation phrase with a shape on each side
        rel = next((r for r, phrase in RELATION_PHRASES.items()
                    if words[start:start + len(phrase.split())] == phrase.split()), None)
        before = [k for k, w in enumerate(where) if w < start]
        after = [k for k, w in enumerate(where) if w > start]
        if rel and before and after:
            relation = (rel, objects[before[-1]][2], objects[after[0]][2])
            break
    return PlanReading(objects=tuple(objects), relation=relation)


def plan_is_right(plan: str, meaning: Meaning) -> bool:
    """Every asked-for object, with its count and (when fixed) colour, and the relation, are in the plan."""
    reading = parse_plan(plan)
    for spec in meaning.objects:
        if not any(shape == spec.shape and count == spec.count and (spec.colour is None or colour == spec.colour)
                   for count, colour, shape in reading.objects):
            return False
    if meaning.relation is None:
        return True
    if reading.relation is None:
        return False
    rel, before, after = reading.relation
    r = meaning.relation
    subject, obj = meaning.objects[r.subject].shape, meaning.objects[r.object].shape
    return (rel, before, after) in ((r.relation, subject, obj), (INVERSE_RELATION[r.relation], obj, subject))
