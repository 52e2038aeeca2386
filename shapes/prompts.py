"""Prompt families of the shapes world, mirroring GenEval's six plus implicit intent and edits.

`generate(family, rng)` returns a `Prompt`: the user text, its family, its structured `Meaning`
(what the judge checks), an explicit restatement (`explicit_text`, e.g. "a green circle" for "a
circle the colour of grass"; pretraining uses it as the think text) and a content-derived id.
Family rules follow GenEval: single_object and two_objects leave colours free (single_object names
a colour half of the time), counting asks for 1..4 objects of one shape, colors names one colour,
position relates two different shapes, color_attr binds two colours to two different shapes.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from shapes.edits import make_edit
from shapes.facts import IMPLICIT_COLOUR_FACTS, IMPLICIT_COUNT_FACTS, Fact
from shapes.layout import sample_scene
from shapes.meaning import Meaning, ObjectSpec, Relation, describe, noun_phrase
from shapes.world import COLOUR_NAMES, DEFAULT_CANVAS_SIZE, MAX_COUNT, RELATION_PHRASES, RELATIONS, SHAPES, plural

FAMILIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr",
                             "implicit_color", "implicit_count", "edit")
GENEVAL_FAMILIES: tuple[str, ...] = FAMILIES[:6]

TEMPLATES: dict[str, tuple[str, ...]] = {
    "single_object": ("a photo of {a}", "{a}", "an image of {a}", "a picture of {a}", "draw {a}"),
    "two_objects": ("a photo of {a} and {b}", "{a} and {b}", "an image with {a} and {b}", "draw {a} and {b}"),
    "counting": ("a photo of {a}", "{a}", "an image of {a}", "draw {a}", "exactly {a}"),
    "colors": ("a photo of {a}", "{a}", "draw {a}", "a {shape} that is {colour}", "a {shape} coloured {colour}"),
    "position": ("a photo of {a} {rel} {b}", "{a} {rel} {b}", "draw {a} {rel} {b}", "an image with {a} {rel} {b}"),
    "color_attr": ("a photo of {a} and {b}", "{a} and {b}", "an image with {a} and {b}", "draw {a} and {b}"),
    "implicit_color": ("{a} the colour of {thing}", "{a} coloured like {thing}",
                       "draw {a} that is the colour of {thing}", "{a} with the same colour as {thing}"),
    "implicit_count": ("as many {shapes} as {fact}", "draw as many {shapes} as {fact}",
                       "a picture with as many {shapes} as {fact}"),
}


@dataclass(frozen=True, kw_only=True)
class Prompt:
    """One generated prompt."""
    id: str                  # "<family>-<10 hex>", derived from family, text and meaning
    family: str              # one of FAMILIES
    text: str                # what the user says
    meaning: Meaning         # what the image must show (edits: the target, with source and preserve)
    explicit_text: str       # explicit restatement; the think text in pretraining


def _prompt(family: str, text: str, meaning: Meaning, explicit: str) -> Prompt:
    digest = hashlib.sha1(f"{family}|{text}|{meaning!r}".encode()).hexdigest()[:10]
    return Prompt(id=f"{family}-{digest}", family=family, text=text, meaning=meaning, explicit_text=explicit)


def _two_shapes(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(SHAPES, 2)
    return a, b


def _geneval(family: str, rng: random.Random) -> tuple[str, Meaning, str]:
    """(text, meaning, explicit text) for one of GenEval's six families."""
    t = rng.choice(TEMPLATES[family])
    if family in ("single_object", "colors"):
        colour = rng.choice(COLOUR_NAMES) if family == "colors" or rng.random() < 0.5 else None
        spec = ObjectSpec(shape=rng.choice(SHAPES), colour=colour)
        m = Meaning(objects=(spec,))
        return t.format(a=noun_phrase(spec), shape=spec.shape, colour=colour), m, describe(m)
    if family == "counting":
        spec = ObjectSpec(shape=rng.choice(SHAPES), count=rng.randint(1, MAX_COUNT))
        m = Meaning(objects=(spec,))
        return t.format(a=noun_phrase(spec, number_one=True)), m, describe(m, number_one=True)
    if family in ("two_objects", "color_attr", "position"):
        s1, s2 = _two_shapes(rng)
        c1, c2 = rng.sample(COLOUR_NAMES, 2) if family == "color_attr" else (None, None)
        a, b = ObjectSpec(shape=s1, colour=c1), ObjectSpec(shape=s2, colour=c2)
        rel = Relation(subject=0, relation=rng.choice(RELATIONS), object=1) if family == "position" else None
        m = Meaning(objects=(a, b), relation=rel)
        text = t.format(a=noun_phrase(a), b=noun_phrase(b), rel=RELATION_PHRASES[rel.relation] if rel else "")
        return text, m, describe(m)
    raise ValueError(f"_geneval: family={family!r} is not one of {GENEVAL_FAMILIES}")


def _implicit_color(rng: random.Random, fact: Fact | None = None) -> tuple[str, Meaning, str]:
    fact = fact or rng.choice(IMPLICIT_COLOUR_FACTS)
    shape = rng.choice(SHAPES)
    m = Meaning(objects=(ObjectSpec(shape=shape, colour=str(fact.value)),), fact=fact)
    text = rng.choice(TEMPLATES["implicit_color"]).format(a=noun_phrase(ObjectSpec(shape=shape)), thing=fact.phrase)
    return text, m, describe(m)


def _implicit_count(rng: random.Random, fact: Fact | None = None) -> tuple[str, Meaning, str]:
    fact = fact or rng.choice(IMPLICIT_COUNT_FACTS)
    shape = rng.choice(SHAPES)
    m = Meaning(objects=(ObjectSpec(shape=shape, count=int(fact.value)),), fact=fact)
    text = rng.choice(TEMPLATES["implicit_count"]).format(shapes=plural(shape), fact=fact.phrase)
    return text, m, describe(m, number_one=True)


def _edit(rng: random.Random, canvas_size: int) -> tuple[str, Meaning, str]:
    """An edit of a fresh source scene drawn from a GenEval family (at most 3 objects)."""
    for _ in range(20):
        base = rng.choice(GENEVAL_FAMILIES)
        _, source_meaning, _ = _geneval(base, rng)
        if base == "counting" and source_meaning.objects[0].count > 3:
            continue
        try:
            edit = make_edit(sample_scene(source_meaning, rng, canvas_size=canvas_size), rng)
        except RuntimeError:        # e.g. three identical squares: nothing to refer to, no room
            continue
        return edit.instruction, edit.meaning, describe(edit.meaning)
    raise RuntimeError(f"_edit: no feasible edit found in 20 source scenes ({canvas_size}px)")


def generate(family: str, rng: random.Random, *, canvas_size: int = DEFAULT_CANVAS_SIZE,
             fact: Fact | None = None) -> Prompt:
    """One prompt of `family`, drawn with `rng` (canvas_size matters only for edit source scenes).
    `fact` fixes the fact of an implicit-intent prompt (one of the family's usable facts)."""
    if fact is not None:
        usable = {"implicit_color": IMPLICIT_COLOUR_FACTS, "implicit_count": IMPLICIT_COUNT_FACTS}.get(family)
        if usable is None or fact not in usable:
            raise ValueError(f"generate: fact {fact.phrase!r} cannot make a {family!r} prompt"
                             + ("" if usable is None else " (not one of its usable facts)"))
    if family in GENEVAL_FAMILIES:
        text, m, explicit = _geneval(family, rng)
    elif family == "implicit_color":
        text, m, explicit = _implicit_color(rng, fact)
    elif family == "implicit_count":
        text, m, explicit = _implicit_count(rng, fact)
    elif family == "edit":
        text, m, explicit = _edit(rng, canvas_size)
    else:
        raise ValueError(f"generate: family={family!r} is not one of {FAMILIES}")
    return _prompt(family, text, m, explicit)
