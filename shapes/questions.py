"""Atomic yes/no questions about an image, answered with a soft confidence in [0, 1].

Kinds (DSG/TIFA-style atoms of a prompt's meaning):
  exists     "is there a red circle?"           1 - prod_i (1 - p_i)
  count      "are there exactly three squares?" P(N = n), N a sum of Bernoulli(p_i)
  colour_of  "is the circle blue?"              P(a circle exists) * E_i[p_i(blue) | circle]
  relation   "is the circle left of the square?" max_{i != j} p_i(a) p_j(b) soft_rel(i, j)
where p_i(shape, colour) = p_i(shape) * p_i(colour) are detection `i`'s probabilities (colour factor
omitted when the question names none) and soft_rel is the sigmoid version of GenEval's rule.
`truth(scene, q)` is the exact answer from a scene's objects, for tests and question sets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from shapes.detect import Detection, analyse
from shapes.meaning import Meaning, ObjectSpec, definite_phrase, noun_phrase
from shapes.relations import geneval_relations, relation_prob
from shapes.scene import Scene
from shapes.world import COLOURS, RELATION_PHRASES, RELATIONS, SHAPES, number_word, plural

KINDS: tuple[str, ...] = ("exists", "count", "colour_of", "relation")


@dataclass(frozen=True, kw_only=True)
class AtomicQuestion:
    """One atomic question; which fields matter depends on `kind`."""
    kind: str                            # one of KINDS
    shape: str                           # the (subject) shape
    colour: str | None = None            # exists/count/relation: optional filter; colour_of: asked colour
    n: int | None = None                 # count: the exact number asked
    relation: str | None = None          # relation: left_of / right_of / above / below
    other_shape: str | None = None       # relation: the object's shape
    other_colour: str | None = None      # relation: optional filter on the object

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"AtomicQuestion.kind={self.kind!r}: not one of {KINDS}")
        for name in ("shape",) + (("other_shape",) if self.kind == "relation" else ()):
            if getattr(self, name) not in SHAPES:
                raise ValueError(f"AtomicQuestion.{name}={getattr(self, name)!r}: not one of {SHAPES}")
        for name in ("colour", "other_colour"):
            if getattr(self, name) not in (None, *COLOURS):
                raise ValueError(f"AtomicQuestion.{name}={getattr(self, name)!r}: not a world colour")
        if self.kind == "count" and not (isinstance(self.n, int) and 0 <= self.n <= 5):
            raise ValueError(f"AtomicQuestion.n={self.n!r}: count questions need n in 0..5")
        if self.kind == "colour_of" and self.colour is None:
            raise ValueError("AtomicQuestion.colour: colour_of questions need a colour")
        if self.kind == "relation" and self.relation not in RELATIONS:
            raise ValueError(f"AtomicQuestion.relation={self.relation!r}: not one of {RELATIONS}")

    @property
    def text(self) -> str:
        """The question in words ('is there a red circle?')."""
        subj = ObjectSpec(shape=self.shape, colour=self.colour)
        if self.kind == "exists":
            return f"is there {noun_phrase(subj)}?"
        if self.kind == "count":
            noun = " ".join(w for w in (self.colour, self.shape if self.n == 1 else plural(self.shape)) if w)
            verb = "is" if self.n == 1 else "are"
            return f"{verb} there exactly {number_word(self.n)} {noun}?"
        if self.kind == "colour_of":
            return f"is the {self.shape} {self.colour}?"
        other = ObjectSpec(shape=self.other_shape, colour=self.other_colour)
        return f"is {definite_phrase(subj)} {RELATION_PHRASES[self.relation]} {definite_phrase(other)}?"


def _p(d: Detection, shape: str, colour: str | None) -> float:
    return d.shape_probs[shape] * (d.colour_probs[colour] if colour is not None else 1.0)


def _count_distribution(ps: list[float]) -> np.ndarray:
    """P(N = k) for a sum of independent Bernoulli(p) (Poisson-binomial), k = 0..len(ps)."""
    dist = np.zeros(len(ps) + 1)
    dist[0] = 1.0
    for p in ps:
        dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
        dist[0] *= 1 - p
    return dist


def answer_detections(dets: tuple[Detection, ...] | list[Detection], q: AtomicQuestion) -> float:
    """The soft answer to `q` given an image's detections."""
    ps = [_p(d, q.shape, q.colour if q.kind != "colour_of" else None) for d in dets]
    if q.kind == "exists":
        return float(1 - np.prod([1 - p for p in ps]))
    if q.kind == "count":
        dist = _count_distribution(ps)
        return float(dist[q.n]) if q.n < dist.size else 0.0
    if q.kind == "colour_of":
        total = sum(ps)
        if total <= 0:
            return 0.0
        exists = 1 - np.prod([1 - p for p in ps])
        return float(exists * sum(p * d.colour_probs[q.colour] for p, d in zip(ps, dets)) / total)
    best = 0.0
    for i, a in enumerate(dets):
        for j, b in enumerate(dets):
            p = ps[i] * _p(b, q.other_shape, q.other_colour) if i != j else 0.0
            if p > best:        # skip the box geometry when it cannot raise the maximum
                best = max(best, p * relation_prob(a.bbox, q.relation, b.bbox))
    return float(best)


def answer(image: Image.Image | np.ndarray, question: AtomicQuestion) -> float:
    """Soft confidence in [0, 1] that the answer to `question` about `image` is yes."""
    return answer_detections(analyse(image).detections, question)


def answer_all(image: Image.Image | np.ndarray, questions: list[AtomicQuestion]) -> list[float]:
    """`answer` for many questions, analysing the image once."""
    dets = analyse(image).detections
    return [answer_detections(dets, q) for q in questions]


def truth(scene: Scene, q: AtomicQuestion) -> bool:
    """The exact answer to `q` for a scene, from its objects (relations by GenEval's rule)."""
    def hit(o, shape, colour):
        return o.shape == shape and (colour is None or o.colour == colour)
    if q.kind == "exists":
        return any(hit(o, q.shape, q.colour) for o in scene.objects)
    if q.kind == "count":
        return sum(hit(o, q.shape, q.colour) for o in scene.objects) == q.n
    if q.kind == "colour_of":
        same = [o for o in scene.objects if o.shape == q.shape]
        return bool(same) and all(o.colour == q.colour for o in same)
    return any(hit(a, q.shape, q.colour) and hit(b, q.other_shape, q.other_colour)
               and q.relation in geneval_relations(a.bbox, b.bbox)
               for a in scene.objects for b in scene.objects if a is not b)


def questions_for(meaning: Meaning) -> tuple[AtomicQuestion, ...]:
    """The atomic questions an image satisfying `meaning` answers 'yes' to."""
    out = []
    shapes = [s.shape for s in meaning.objects]
    for spec in meaning.objects:
        out.append(AtomicQuestion(kind="exists", shape=spec.shape, colour=spec.colour))
        out.append(AtomicQuestion(kind="count", shape=spec.shape, colour=spec.colour, n=spec.count))
        if spec.colour is not None and shapes.count(spec.shape) == 1:
            out.append(AtomicQuestion(kind="colour_of", shape=spec.shape, colour=spec.colour))
    rel = meaning.relation
    if rel is not None:
        a, b = meaning.objects[rel.subject], meaning.objects[rel.object]
        out.append(AtomicQuestion(kind="relation", shape=a.shape, colour=a.colour, relation=rel.relation,
                                  other_shape=b.shape, other_colour=b.colour))
    return tuple(out)
