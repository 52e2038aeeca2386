"""GenEval-style strict correctness of an image for a `Meaning`, from the image alone.

An image is correct when every clause holds:
  count      each spec has exactly `count` detections matching its shape (and colour, if given);
  no_extras  every detected object matches some spec. GenEval ignores classes it was not asked
             about; our world is clean, so we are strict: exactly the asked objects, nothing else.
             Stray blobs (components below `world.speck_area`) do not fail correctness; they are
             reported here and lower `quality()`'s no_stray_blobs instead;
  relation   every (subject, object) pair of matching detections stands in the relation, by
             GenEval's rule on bounding boxes (`relations.geneval_relations`);
  preserve   (edits) each object that must stay is found with its shape and colour within
             `preserve_tolerance` px of its source box centre (one detection per object).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from shapes.detect import Detection, analyse
from shapes.meaning import Meaning, ObjectSpec
from shapes.relations import geneval_relations
from shapes.scene import Object

@dataclass(frozen=True, kw_only=True)
class Clause:
    """One checked condition."""
    kind: str                   # "count" | "no_extras" | "relation" | "preserve"
    text: str                   # what was checked and what was found
    passed: bool


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """The judgement of one image."""
    correct: bool                            # all clauses passed
    clauses: tuple[Clause, ...]
    detections: tuple[Detection, ...]
    stray_blobs: int


def spec_text(spec: ObjectSpec) -> str:
    return " ".join(w for w in (spec.colour, spec.shape) if w)


def det_text(d: Detection) -> str:
    return f"{d.colour or 'unknown-colour'} {d.shape or 'blob'} at ({d.center[0]:.1f}, {d.center[1]:.1f})"


def preserve_tolerance(canvas_size: int) -> float:
    """How far (px) a kept object's box centre may drift in an edit."""
    return max(2.0, 0.08 * canvas_size)


def _preserve_clauses(dets: tuple[Detection, ...], keep: tuple[Object, ...], scale: float,
                      tol: float) -> list[Clause]:
    used: set[int] = set()
    out = []
    for obj in keep:
        want = (obj.cx * scale, obj.cy * scale)
        best, best_d = None, tol
        for i, d in enumerate(dets):
            dist = float(np.hypot(d.center[0] - want[0], d.center[1] - want[1]))
            if i not in used and d.shape == obj.shape and d.colour == obj.colour and dist <= best_d:
                best, best_d = i, dist
        if best is not None:
            used.add(best)
        out.append(Clause(kind="preserve", passed=best is not None,
                          text=f"{obj.colour} {obj.shape} stays near ({want[0]:.1f}, {want[1]:.1f})"
                               + ("" if best is not None else ": not found there")))
    return out


def judge(image: Image.Image | np.ndarray, meaning: Meaning) -> Verdict:
    """Strictly judge `image` against `meaning` (see the module docstring for the clauses)."""
    analysis = analyse(image)
    dets = analysis.detections
    owner = [meaning.spec_index(d.shape, d.colour) for d in dets]
    clauses = []
    for i, spec in enumerate(meaning.objects):
        found = sum(1 for o in owner if o == i)
        clauses.append(Clause(kind="count", passed=found == spec.count,
                              text=f"exactly {spec.count} {spec_text(spec)}: found {found}"))
    extras = [det_text(d) for d, o in zip(dets, owner) if o is None]
    clauses.append(Clause(kind="no_extras", passed=not extras,
                          text="no extra objects" if not extras else "extra: " + "; ".join(extras)))
    rel = meaning.relation
    if rel is not None:
        subj = [d for d, o in zip(dets, owner) if o == rel.subject]
        obj = [d for d, o in zip(dets, owner) if o == rel.object]
        holds = bool(subj) and bool(obj) and all(rel.relation in geneval_relations(a.bbox, b.bbox)
                                                 for a in subj for b in obj)
        clauses.append(Clause(kind="relation", passed=holds,
                              text=f"{spec_text(meaning.objects[rel.subject])} {rel.relation} "
                                   f"{spec_text(meaning.objects[rel.object])}: "
                                   + ("holds" if holds else "does not hold")))
    if meaning.preserve:
        side = analysis.segmentation.labels.shape[1]
        scale = side / meaning.source.canvas_size if meaning.source is not None else 1.0
        clauses += _preserve_clauses(dets, meaning.preserve, scale, preserve_tolerance(side))
    return Verdict(correct=all(c.passed for c in clauses), clauses=tuple(clauses),
                   detections=dets, stray_blobs=analysis.stray_blobs)
