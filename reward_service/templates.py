"""Our own prompt templates for LLM decomposers and VLM verifiers (written for this project).

`TEMPLATE_VERSION` is part of every LLM decomposer's cache key: change any text below that changes
what an LLM answers, and bump it, so cached decompositions from the old text are not reused.
Decomposition asks for a JSON list (DSG-style: atoms -> dependencies -> yes/no questions) followed by
positively phrased quality questions; `reward_service.parse` reads and repairs the reply.
Verification asks one question per request and wants a bare "yes" or "no" (method-facts: DVReward).
"""
from __future__ import annotations

from reward_service.schema import QUALITY_ASPECTS, SEMANTIC_CATEGORIES

TEMPLATE_VERSION = "dsg-json-v1"

DECOMPOSE_TEMPLATE = """\
You turn an image-generation prompt into yes/no questions that a careful judge would ask about an
image generated from it. Reply with a JSON list only, no prose, no code fences.

Semantic questions: break the prompt into atomic facts (each entity, its count, each attribute,
each action, each spatial relation, each piece of text to render, each thing that must NOT appear,
and the style, environment and viewpoint when the prompt names them). Ask one question per fact.
A question that only makes sense when another holds lists that question's id in "parents"
(e.g. "is the cat black?" has the parent "is there a cat?"). Parents come before their children.
Categories: {semantic_categories}.

Quality questions: then ask 2 to 4 positively phrased questions about visual quality that fit this
prompt, one aspect each ("are the hands anatomically correct?"), with no parents.
Aspects: {quality_aspects}.

Each list item is an object with exactly these keys:
  "id": "q1", "q2", ... in order,
  "question": the yes/no question, answerable from the image alone,
  "kind": "semantic" or "quality",
  "category": one of the categories (semantic) or aspects (quality),
  "parents": a list of ids (empty when none).

Example for "two red apples on a wooden table":
[{{"id": "q1", "question": "Is there an apple?", "kind": "semantic", "category": "existence", "parents": []}},
 {{"id": "q2", "question": "Are there exactly two apples?", "kind": "semantic", "category": "count", "parents": ["q1"]}},
 {{"id": "q3", "question": "Are the apples red?", "kind": "semantic", "category": "attribute", "parents": ["q1"]}},
 {{"id": "q4", "question": "Is there a table?", "kind": "semantic", "category": "existence", "parents": []}},
 {{"id": "q5", "question": "Is the table wooden?", "kind": "semantic", "category": "attribute", "parents": ["q4"]}},
 {{"id": "q6", "question": "Are the apples on the table?", "kind": "semantic", "category": "spatial", "parents": ["q1", "q4"]}},
 {{"id": "q7", "question": "Do the apples have natural, undistorted shapes?", "kind": "quality", "category": "geometry", "parents": []}},
 {{"id": "q8", "question": "Does the wood grain look realistic?", "kind": "quality", "category": "texture", "parents": []}}]

Prompt: {prompt}
JSON:"""

RETRY_SUFFIX = """

Your previous reply could not be used: {reason}
Reply again with the JSON list only."""

VERIFIER_SYSTEM_PROMPT = (
    "You are a strict visual judge. You are shown an image and asked one yes/no question about it. "
    "Answer with a single word: \"yes\" or \"no\". Answer \"no\" when the thing the question is about "
    "is absent from the image, and \"no\" when you are unsure.")

VERIFIER_USER_TEMPLATE = "Question: {question}\nAnswer yes or no."


def decomposition_request(prompt: str, *, previous_error: str | None = None) -> str:
    """The decomposition request for `prompt`; with `previous_error`, the retry request."""
    text = DECOMPOSE_TEMPLATE.format(semantic_categories=", ".join(SEMANTIC_CATEGORIES),
                                     quality_aspects=", ".join(QUALITY_ASPECTS), prompt=prompt)
    if previous_error is not None:
        text += RETRY_SUFFIX.format(reason=previous_error)
    return text


def verifier_request(question: str) -> str:
    """The user turn that accompanies the image for one question."""
    return VERIFIER_USER_TEMPLATE.format(question=question)
