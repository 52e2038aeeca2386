"""What the LLM/MLLM backends (vllm, hf, openai) share besides their options (llm_options);
imports nothing heavy.

  decompose   `decompose_batched` runs `parse.decompose_with_retries` for many prompts at once: every
              round sends one batched generate call holding each unfinished prompt's next request
              (its first request, or its retry request naming what was wrong), so a batch costs at
              most `budget` engine calls, and the validate / repair / retry / fail-naming-the-prompt
              rules are exactly decompose_with_retries'.
  verify      `flatten` lays out (image, question) requests with every question of one image
              adjacent (the image prefix is shared through prefix caching); `score` turns the first
              generated token's top-k log-probs into P(yes) / (P(yes) + P(no)) and falls back to the
              generated text; `verifier_messages` is the chat every verifier backend sends.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from reward_service.aggregate import yes_from_text, yes_probability
from reward_service.backends import DecomposeRequest
from reward_service.parse import MAX_QUESTIONS, decompose_with_retries
from reward_service.schema import QUALITY_ASPECTS, SEMANTIC_CATEGORIES, DecomposerVersion, QuestionSet, prompt_key
from reward_service.templates import VERIFIER_SYSTEM_PROMPT, verifier_request


def request_key(request: DecomposeRequest) -> str:
    """The prompt half of an LLM decomposer's cache key: the text alone (the meaning is not read)."""
    return prompt_key(request.prompt)


# ---- decomposition ----------------------------------------------------------------------------------

def question_list_schema() -> dict[str, Any]:
    """The JSON schema of a decomposition reply (the list `templates.DECOMPOSE_TEMPLATE` asks for).

    String lengths are bounded so a constrained weak model cannot run on inside one string."""
    ident = {"type": "string", "minLength": 1, "maxLength": 8}
    item = {"type": "object",
            "properties": {"id": ident,
                           "question": {"type": "string", "minLength": 3, "maxLength": 200},
                           "kind": {"type": "string", "enum": ["semantic", "quality"]},
                           "category": {"type": "string", "enum": list(SEMANTIC_CATEGORIES + QUALITY_ASPECTS)},
                           "parents": {"type": "array", "items": ident, "maxItems": 8}},
            "required": ["id", "question", "kind", "category", "parents"],
            "additionalProperties": False}
    return {"type": "array", "items": item, "minItems": 1, "maxItems": MAX_QUESTIONS}


class _NeedsReply(Exception):
    """Raised inside a replayed decompose_with_retries when it asks for a reply not generated yet."""

    def __init__(self, request: str) -> None:
        super().__init__("reply not generated yet")
        self.request = request


def decompose_batched(generate_many: Callable[[list[str]], list[str]], prompts: Sequence[str], *,
                      budget: int, version: DecomposerVersion) -> list[QuestionSet]:
    """Question sets for `prompts`, in order, with at most `budget` calls of `generate_many`.

    `generate_many(requests) -> replies` (same length, same order) is one batched engine call.
    Each round replays decompose_with_retries for every unfinished prompt over the replies it has
    had so far; where it asks for one more, that request joins the round's batch. A prompt whose
    budget runs out raises decompose_with_retries' DecompositionError naming the prompt."""
    replies: list[list[str]] = [[] for _ in prompts]
    done: dict[int, QuestionSet] = {}
    for _ in range(budget + 1):           # the last replay only finishes (or fails) what the budget allowed
        pending: dict[int, str] = {}
        for i, prompt in enumerate(prompts):
            if i in done:
                continue
            so_far = iter(replies[i])

            def replay(request: str, so_far=so_far) -> str:
                reply = next(so_far, None)
                if reply is None:
                    raise _NeedsReply(request)
                return reply

            try:
                done[i] = decompose_with_retries(replay, prompt, budget=budget, version=version)
            except _NeedsReply as need:
                pending[i] = need.request
        if not pending:
            break
        out = generate_many(list(pending.values()))
        if len(out) != len(pending):
            raise RuntimeError(f"{version}: the engine returned {len(out)} replies for {len(pending)} requests")
        for i, reply in zip(pending, out):
            replies[i].append(reply)
    return [done[i] for i in range(len(prompts))]


# ---- verification -----------------------------------------------------------------------------------

def verifier_messages(image_part: dict[str, Any], question: str) -> list[dict[str, Any]]:
    """The chat for one question: our system prompt, then the image, then the question (so every
    question of one image shares the system + image prefix)."""
    return [{"role": "system", "content": VERIFIER_SYSTEM_PROMPT},
            {"role": "user", "content": [image_part, {"type": "text", "text": verifier_request(question)}]}]


def flatten(items: Sequence[tuple[Any, QuestionSet]]) -> list[tuple[int, str]]:
    """(image index, question text) for every question, each image's questions adjacent, in order."""
    return [(i, q.text) for i, (_, qs) in enumerate(items) for q in qs.questions]


def regroup(scores: Sequence[float], items: Sequence[tuple[Any, QuestionSet]]) -> list[list[float]]:
    """Inverse of `flatten` for the per-question scores."""
    out, at = [], 0
    for _, qs in items:
        out.append([float(s) for s in scores[at:at + len(qs.questions)]])
        at += len(qs.questions)
    if at != len(scores):
        raise RuntimeError(f"regroup: {len(scores)} scores for {at} questions")
    return out


def score(top_logprobs: Iterable[tuple[str, float]], text: str) -> float:
    """P(yes) / (P(yes) + P(no)) over the first token's top-k (every yes/no variant summed), or the
    generated text's answer (`yes_from_text`) when neither word is among the top k."""
    p = yes_probability(list(top_logprobs))
    return p if p is not None else yes_from_text(text)


def as_pil(image: Any):
    """A PIL RGB image from a PIL image or an HxWx3 uint8 array."""
    from PIL import Image
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    import numpy as np
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ValueError(f"verifier: expected a PIL image or an HxWx3 uint8 array, got {array.dtype} {array.shape}")
    return Image.fromarray(array[..., :3])
