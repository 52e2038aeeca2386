"""The structured meaning of a prompt: what the judge checks and what DVReward asks about.

A `Meaning` lists required object groups (`ObjectSpec`: shape, colour or None for "any colour",
exact count) and at most one `Relation` between two groups. Implicit prompts carry the `Fact` they
were resolved through; edit prompts carry their `source` scene and the objects that must stay put
(`preserve`). Specs must be disjoint (no object can match two specs), so counting is unambiguous.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from shapes.facts import Fact
from shapes.scene import Object, Scene
from shapes.world import COLOURS, RELATION_PHRASES, RELATIONS, SHAPES, article, number_word, plural

MAX_SPEC_COUNT = 8


@dataclass(frozen=True, kw_only=True)
class ObjectSpec:
    """`count` objects of `shape`, each of `colour` (None: any colour, GenEval's plain classes)."""
    shape: str
    colour: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"ObjectSpec.shape={self.shape!r}: not one of {SHAPES}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"ObjectSpec.colour={self.colour!r}: not one of {tuple(COLOURS)} or None")
        if not 1 <= self.count <= MAX_SPEC_COUNT:
            raise ValueError(f"ObjectSpec.count={self.count!r}: must be in 1..{MAX_SPEC_COUNT}")

    def matches(self, shape: str | None, colour: str | None) -> bool:
        """Does an object of this shape and colour count towards this spec?"""
        return shape == self.shape and (self.colour is None or colour == self.colour)


@dataclass(frozen=True, kw_only=True)
class Relation:
    """`objects[subject]` is `relation` of `objects[object]` (e.g. left_of), judged by box centres."""
    subject: int
    relation: str
    object: int

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"Relation.relation={self.relation!r}: not one of {RELATIONS}")
        if self.subject == self.object:
            raise ValueError(f"Relation: subject and object are both objects[{self.subject}]")


@dataclass(frozen=True, kw_only=True)
class Meaning:
    """Everything a prompt asks for, explicitly."""
    objects: tuple[ObjectSpec, ...]            # disjoint required groups; nothing else may appear
    relation: Relation | None = None           # position / add / move
    fact: Fact | None = None                   # implicit_color / implicit_count: the fact used
    source: Scene | None = None                # edit: the scene the instruction is applied to
    preserve: tuple[Object, ...] = ()          # edit: objects that must stay (shape, colour, place)

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        object.__setattr__(self, "preserve", tuple(self.preserve))
        if not self.objects:
            raise ValueError("Meaning.objects: at least one object spec is required")
        for i, a in enumerate(self.objects):
            for j in range(i + 1, len(self.objects)):
                b = self.objects[j]
                if a.shape == b.shape and (a.colour is None or b.colour is None or a.colour == b.colour):
                    raise ValueError(f"Meaning.objects[{i}] and [{j}] overlap ({a} / {b}): "
                                     "specs must be disjoint")
        if self.relation is not None:
            for name in ("subject", "object"):
                k = getattr(self.relation, name)
                if not 0 <= k < len(self.objects):
                    raise ValueError(f"Meaning.relation.{name}={k}: no such object spec "
                                     f"(have {len(self.objects)})")

    def spec_index(self, shape: str | None, colour: str | None) -> int | None:
        """Index of the spec an object of this shape/colour counts towards, or None (an extra)."""
        for i, spec in enumerate(self.objects):
            if spec.matches(shape, colour):
                return i
        return None


def from_objects(objects: tuple[Object, ...] | list[Object]) -> tuple[tuple[ObjectSpec, ...], list[int]]:
    """Group objects into colour-specific specs; also return each object's spec index."""
    keys = list(dict.fromkeys((o.shape, o.colour) for o in objects))
    counts = Counter((o.shape, o.colour) for o in objects)
    specs = tuple(ObjectSpec(shape=s, colour=c, count=counts[(s, c)]) for s, c in keys)
    return specs, [keys.index((o.shape, o.colour)) for o in objects]


def noun_phrase(spec: ObjectSpec, *, number_one: bool = False) -> str:
    """'a red circle', 'an orange square', 'three squares' ('one square' with number_one)."""
    words = ([spec.colour] if spec.colour else [])
    if spec.count == 1:
        words.append(spec.shape)
        first = "one" if number_one else article(words[0])
        return " ".join([first] + words)
    words.append(plural(spec.shape))
    return " ".join([number_word(spec.count)] + words)


def definite_phrase(spec: ObjectSpec) -> str:
    """'the red circle', 'the squares'."""
    words = ([spec.colour] if spec.colour else []) + [spec.shape if spec.count == 1 else plural(spec.shape)]
    return " ".join(["the"] + words)


def join_phrases(parts: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    if len(parts) <= 2:
        return " and ".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(meaning: Meaning, *, number_one: bool = False) -> str:
    """The explicit restatement of a meaning ('a green circle'; 'a circle to the left of a square').

    `number_one` says 'one square' instead of 'a square' (counting prompts)."""
    rel = meaning.relation
    if rel is not None and len(meaning.objects) == 2:
        a, b = meaning.objects[rel.subject], meaning.objects[rel.object]
        return (f"{noun_phrase(a, number_one=number_one)} {RELATION_PHRASES[rel.relation]} "
                f"{noun_phrase(b, number_one=number_one)}")
    text = join_phrases([noun_phrase(s, number_one=number_one) for s in meaning.objects])
    if rel is not None:
        a, b = meaning.objects[rel.subject], meaning.objects[rel.object]
        text += f", with {definite_phrase(a)} {RELATION_PHRASES[rel.relation]} {definite_phrase(b)}"
    return text
