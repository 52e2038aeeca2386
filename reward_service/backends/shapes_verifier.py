"""The shapes verifier: soft yes-probabilities for a question set, measured from the image.

Each question must carry a shapes `atom` (reward_service.backends.shapes_decomposer writes them):
  exists / count / colour_of / relation   shapes.questions.answer_detections (the programmatic
                                          judge's soft answers; one image analysis for the set)
  only   P(every detection matches some listed spec) = prod_d sum_k p_d(spec_k)
         (specs are disjoint, so the sum is a probability)
  stays  P(some detection of the shape and colour lies within the judge's preserve tolerance of
         the source position) = 1 - prod_d (1 - p_d * sigmoid((tol - dist_d) / (0.25 tol)))
  quality  shapes.quality.quality(image)[key]: clean_edges / plain_background / no_stray_blobs
A question without a shapes atom is a ValueError naming it: this backend cannot read free text.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from reward_service.schema import Question, QuestionSet
from shapes.detect import Detection, analyse
from shapes.judge import preserve_tolerance
from shapes.quality import QUALITY_KEYS, quality
from shapes.questions import KINDS as ATOMIC_KINDS
from shapes.questions import AtomicQuestion, answer_detections


def _p(d: Detection, shape: str, colour: str | None) -> float:
    return d.shape_probs.get(shape, 0.0) * (d.colour_probs.get(colour, 0.0) if colour is not None else 1.0)


def _only(dets: tuple[Detection, ...], specs: list[dict]) -> float:
    return float(np.prod([min(1.0, sum(_p(d, s["shape"], s.get("colour")) for s in specs)) for d in dets]))


def _stays(dets: tuple[Detection, ...], atom: dict, side: int) -> float:
    scale = side / atom["canvas_size"]
    want = (atom["cx"] * scale, atom["cy"] * scale)
    tol = preserve_tolerance(side)
    miss = 1.0
    for d in dets:
        dist = math.hypot(d.center[0] - want[0], d.center[1] - want[1])
        z = (tol - dist) / (0.25 * tol)
        near = 1.0 / (1.0 + math.exp(-z)) if z > -50 else 0.0
        miss *= 1.0 - _p(d, atom["shape"], atom["colour"]) * near
    return 1.0 - miss


def _atomic(q: Question) -> AtomicQuestion:
    return AtomicQuestion(**q.atom)


def _problem(q: Question) -> str | None:
    """Why the shapes verifier cannot answer `q`, or None."""
    atom = q.atom or {}
    kind = atom.get("kind")
    if kind in ATOMIC_KINDS:
        try:
            _atomic(q)
        except (TypeError, ValueError) as e:
            return str(e)
        return None
    if kind == "only":
        specs = atom.get("specs")
        ok = isinstance(specs, list) and specs and all(isinstance(s, dict) and "shape" in s for s in specs)
        return None if ok else f"'only' atom needs a non-empty list of specs, got {specs!r}"
    if kind == "stays":
        missing = [k for k in ("shape", "colour", "cx", "cy", "canvas_size") if k not in atom]
        return f"'stays' atom lacks {missing}" if missing else None
    if kind == "quality":
        return None if atom.get("key") in QUALITY_KEYS else f"quality key {atom.get('key')!r} not in {QUALITY_KEYS}"
    return f"no shapes atom (atom={q.atom!r})"


def check_answerable(qs: QuestionSet) -> None:
    """Raise a ValueError naming the first question this verifier cannot answer."""
    for q in qs.questions:
        problem = _problem(q)
        if problem is not None:
            raise ValueError(f"shapes verifier: question {q.id!r} ({q.text!r}) of prompt {qs.prompt!r} "
                             f"is not answerable: {problem}")


def answer_set(image: Image.Image | np.ndarray, qs: QuestionSet) -> list[float]:
    """One soft score in [0, 1] per question of `qs`, in order."""
    check_answerable(qs)
    analysis = analyse(image)
    dets = analysis.detections
    side = int(analysis.segmentation.labels.shape[1])
    measured = quality(image) if qs.quality else {}
    out = []
    for q in qs.questions:
        kind = q.atom["kind"]
        if kind in ATOMIC_KINDS:
            s = answer_detections(dets, _atomic(q))
        elif kind == "only":
            s = _only(dets, q.atom["specs"])
        elif kind == "stays":
            s = _stays(dets, q.atom, side)
        else:
            s = measured[q.atom["key"]]
        out.append(min(1.0, max(0.0, float(s))))
    return out


class ShapesVerifier:
    """`answer_set` as an object, like the model-backed verifiers."""
    name = "shapes"

    def answer(self, image: Image.Image | np.ndarray, qs: QuestionSet) -> list[float]:
        return answer_set(image, qs)

    def answer_batch(self, items: list[tuple[Image.Image | np.ndarray, QuestionSet]]) -> list[list[float]]:
        return [answer_set(image, qs) for image, qs in items]
