"""Exact decomposition of a shapes prompt from its structured `Meaning` (no LLM involved).

Per object spec i (ids in brackets; parents after the arrow):
  [e<i>] existence  "is there a red circle?"                      atom: exists
  [c<i>] count      "is there exactly one red circle?"   -> e<i>   atom: count (specs of <= 5 objects)
  [a<i>] attribute  "is the circle red?"                 -> e<i>   atom: colour_of (coloured spec whose
                                                                    shape no other spec shares)
then [r] spatial "is the circle to the left of the square?" -> e<subject>, e<object> (atom: relation),
[n] negative "is there nothing in the image besides a red circle and a square?" -> every e<i> (atom:
only — the judge's no-extras clause; without the parents an empty canvas would pass it, and drawing
nothing would out-score drawing the wrong thing), for edits [p<k>] spatial "is the red circle still
at the top left?" per object that must stay (atom: stays), and three quality questions the shapes
verifier measures:
  [qg] geometry   clean edges       (atom: quality / clean_edges)
  [qc] coherence  no stray blobs    (atom: quality / no_stray_blobs)
  [qt] texture    plain background  (atom: quality / plain_background)
The exists/count/colour_of/relation atoms are exactly `shapes.questions.questions_for(meaning)`.
The prompt key's context is the canonical meaning JSON: an edit instruction's questions depend on
its source scene, not on its text alone.
"""
from __future__ import annotations

from dataclasses import asdict

from reward_service.backends.shapes_meaning_json import canonical
from reward_service.schema import DecomposerVersion, Question, QuestionSet, prompt_key
from shapes.meaning import Meaning, join_phrases, noun_phrase
from shapes.questions import AtomicQuestion
from shapes.scene import Object

VERSION = DecomposerVersion(name="shapes", template_version="shapes-v2")
MAX_COUNT_ASKED = 5          # AtomicQuestion counts (and number words) go to five
QUALITY_QUESTIONS: tuple[tuple[str, str, str, str], ...] = (
    # (id, aspect, quality key, text)
    ("qg", "geometry", "clean_edges", "are the shapes drawn with clean edges, without muddy or off-palette pixels?"),
    ("qc", "coherence", "no_stray_blobs", "is the image free of stray specks and blobs?"),
    ("qt", "texture", "plain_background", "is the background plain white?"),
)


def atom_of(q: AtomicQuestion) -> dict:
    """The AtomicQuestion's fields as a JSON-able dict (None fields left out)."""
    return {k: v for k, v in asdict(q).items() if v is not None}


def _where(obj: Object, canvas_size: int) -> str:
    """'the top left', 'the centre', ... from a 3 x 3 grid of the canvas."""
    col = ("left", "", "right")[min(2, int(3 * obj.cx / canvas_size))]
    row = ("top", "", "bottom")[min(2, int(3 * obj.cy / canvas_size))]
    return "the " + (" ".join(w for w in (row, col) if w) or "centre")


def _spec_questions(meaning: Meaning) -> list[Question]:
    out = []
    shapes = [s.shape for s in meaning.objects]
    for i, spec in enumerate(meaning.objects):
        e = AtomicQuestion(kind="exists", shape=spec.shape, colour=spec.colour)
        out.append(Question(id=f"e{i}", text=e.text, kind="semantic", category="existence", atom=atom_of(e)))
        if spec.count <= MAX_COUNT_ASKED:
            c = AtomicQuestion(kind="count", shape=spec.shape, colour=spec.colour, n=spec.count)
            out.append(Question(id=f"c{i}", text=c.text, kind="semantic", category="count",
                                parents=(f"e{i}",), atom=atom_of(c)))
        if spec.colour is not None and shapes.count(spec.shape) == 1:
            a = AtomicQuestion(kind="colour_of", shape=spec.shape, colour=spec.colour)
            out.append(Question(id=f"a{i}", text=a.text, kind="semantic", category="attribute",
                                parents=(f"e{i}",), atom=atom_of(a)))
    return out


def _relation_and_negative(meaning: Meaning) -> list[Question]:
    out = []
    rel = meaning.relation
    if rel is not None:
        a, b = meaning.objects[rel.subject], meaning.objects[rel.object]
        r = AtomicQuestion(kind="relation", shape=a.shape, colour=a.colour, relation=rel.relation,
                           other_shape=b.shape, other_colour=b.colour)
        out.append(Question(id="r", text=r.text, kind="semantic", category="spatial",
                            parents=(f"e{rel.subject}", f"e{rel.object}"), atom=atom_of(r)))
    phrase = join_phrases([noun_phrase(s) for s in meaning.objects])
    out.append(Question(id="n", text=f"is there nothing in the image besides {phrase}?", kind="semantic",
                        category="negative", parents=tuple(f"e{i}" for i in range(len(meaning.objects))),
                        atom={"kind": "only", "specs": [{"shape": s.shape, "colour": s.colour} for s in meaning.objects]}))
    if meaning.preserve:
        size = meaning.source.canvas_size if meaning.source is not None else None
        if size is None:
            raise ValueError("shapes decomposer: meaning.preserve needs meaning.source (its canvas size)")
        for k, obj in enumerate(meaning.preserve):
            spec = meaning.spec_index(obj.shape, obj.colour)
            out.append(Question(id=f"p{k}", text=f"is the {obj.colour} {obj.shape} still at {_where(obj, size)}?",
                                kind="semantic", category="spatial",
                                parents=(f"e{spec}",) if spec is not None else (),
                                atom={"kind": "stays", "shape": obj.shape, "colour": obj.colour,
                                      "cx": obj.cx, "cy": obj.cy, "canvas_size": size}))
    return out


def decompose(prompt: str, *, meaning: Meaning) -> QuestionSet:
    """The question set of a shapes prompt (see the module docstring for the questions)."""
    quality = [Question(id=qid, text=text, kind="quality", category=aspect, atom={"kind": "quality", "key": key})
               for qid, aspect, key, text in QUALITY_QUESTIONS]
    return QuestionSet(prompt=prompt, prompt_hash=prompt_key(prompt, context=canonical(meaning)), version=VERSION,
                       questions=tuple(_spec_questions(meaning) + _relation_and_negative(meaning) + quality))


class ShapesDecomposer:
    """The `decompose` function as an object with a `version`, like the LLM decomposers."""
    version = VERSION

    def decompose(self, prompt: str, *, meaning: Meaning) -> QuestionSet:
        return decompose(prompt, meaning=meaning)

    def decompose_batch(self, requests: list) -> list[QuestionSet]:
        """`DecomposeRequest`s (each must carry its `meaning`) -> question sets, in order."""
        out = []
        for r in requests:
            if r.meaning is None:
                raise ValueError(f"shapes decomposer: prompt {r.prompt!r} has no structured meaning (this backend "
                                 "reads the shapes world's prompts; for prompt files use an LLM decomposer: "
                                 "reward.decomposer.name=vllm, hf or openai)")
            out.append(decompose(r.prompt, meaning=r.meaning))
        return out
