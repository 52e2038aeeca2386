"""DVReward's worker classes, plain Python: a decomposer behind the persistent cache, and a verifier
with the reward rule. They run in-process as they are (the sync baseline, tests) and
`actors.reward_workers` serves them as Ray actor pools (nothing added). No Ray import here: an image
given as a Ray object ref is fetched only when Ray is already loaded in this process.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reward_service.aggregate import RewardResult
from reward_service.backends import BackendSpec, DecomposeRequest, build_decomposer, build_verifier
from reward_service.cache import DecompositionCache
from reward_service.reward import RewardConfig
from reward_service.schema import QuestionSet, prompt_key


# ---- records ---------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class DecomposeResult:
    """What one DecomposerWorker call returns: the sets, in request order, and where they came from."""
    question_sets: tuple[QuestionSet, ...]
    cache_hits: int                # distinct prompts found in the cache
    decomposed: int                # distinct prompts the backend decomposed (and stored)


@dataclass(frozen=True, kw_only=True)
class ScoreRequest:
    """One image to score against its prompt's question set."""
    key: str                       # names the sample in errors and results (e.g. "step3/g2/s5")
    image: Any                     # uint8 array (H, W, 3), or a ray.ObjectRef to one
    question_set: QuestionSet


@dataclass(frozen=True, kw_only=True)
class ScoreResult:
    """The reward of one image and its audit record."""
    key: str                       # the request's key
    reward: float                  # == audit.reward
    audit: RewardResult            # every question, its score and effective score, the two means
    verifier: str                  # the verifier backend's name


class DecomposerKeyError(RuntimeError):
    """A backend made a set whose cache key differs from the key it was looked up under: storing it
    would make every later lookup miss (re-decomposing the prompt each step)."""


# ---- the plain worker classes ----------------------------------------------------------------------

def request_key(decomposer: Any, request: DecomposeRequest) -> str:
    """The prompt half of the cache key for `request` under `decomposer`, before decomposing it.

    The backend's own `key(request)` when it has one; otherwise the rule of the existing backends:
    the shapes backend hashes the text with its canonical meaning JSON, text-based (LLM) backends
    the text alone (`reward_service.parse`). `DecomposerWorker` checks every made set against it."""
    if callable(getattr(decomposer, "key", None)):
        return decomposer.key(request)
    if decomposer.version.name == "shapes" and request.meaning is not None:
        from reward_service.backends.shapes_meaning_json import canonical
        return prompt_key(request.prompt, context=canonical(request.meaning))
    return prompt_key(request.prompt)


class DecomposerWorker:
    """A decomposer backend behind the persistent cache: a cached prompt is never decomposed again."""

    def __init__(self, spec: BackendSpec, *, cache_path: str | None = None) -> None:
        self.decomposer = build_decomposer(spec)
        self.cache = DecompositionCache(cache_path) if cache_path is not None else None

    def decompose(self, requests: list[DecomposeRequest]) -> DecomposeResult:
        """Question sets for `requests`, in order: cached ones read, the rest decomposed in one batch
        and written back (one transaction)."""
        version = self.decomposer.version
        keys = [request_key(self.decomposer, r) for r in requests]
        found = self.cache.get_many((k, version) for k in keys) if self.cache is not None else {}
        by_key = {k: found[(k, str(version))] for k in keys if (k, str(version)) in found}
        todo = {k: r for k, r in zip(keys, requests) if k not in by_key}      # distinct missing keys
        made = self.decomposer.decompose_batch(list(todo.values())) if todo else []
        if len(made) != len(todo):
            raise DecomposerKeyError(f"decomposer {version}: {len(made)} sets for {len(todo)} prompts")
        for (k, r), qs in zip(todo.items(), made):
            if (qs.prompt_hash, str(qs.version)) != (k, str(version)):
                raise DecomposerKeyError(
                    f"decomposer {version}: prompt {r.prompt!r} was looked up as ({k[:12]}…, {version}) but its "
                    f"set is keyed ({qs.prompt_hash[:12]}…, {qs.version}); give the backend a key(request) method")
            by_key[k] = qs
        if self.cache is not None and made:
            self.cache.put_many(made)
        return DecomposeResult(question_sets=tuple(by_key[k] for k in keys), cache_hits=len(found),
                               decomposed=len(made))


def check_image(image: Any, *, key: str) -> np.ndarray:
    """The image as scored: a uint8 array (H, W, 3); anything else is a ValueError naming the sample."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 \
            or 0 in image.shape:
        what = f"{image.dtype} array {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"score request {key!r}: image must be a uint8 array (H, W, 3), got {what}")
    return image


def resolve_images(requests: Sequence[ScoreRequest]) -> list[np.ndarray]:
    """The requests' images, fetching object refs from the object store in one call, checked.
    (Without Ray loaded in this process no image can be an object ref.)"""
    ray = sys.modules.get("ray")
    is_ref = (lambda x: isinstance(x, ray.ObjectRef)) if ray is not None else (lambda x: False)
    refs = [r.image for r in requests if is_ref(r.image)]
    fetched = iter(ray.get(refs) if refs else [])
    images = [next(fetched) if is_ref(r.image) else r.image for r in requests]
    return [check_image(image, key=r.key) for image, r in zip(images, requests)]


class VerifierWorker:
    """A verifier backend and the reward rule: a batch of images -> rewards with their audit records
    (the same numbers as `reward_service.reward.DVReward.score` on each image)."""

    def __init__(self, spec: BackendSpec, *, reward: RewardConfig | None = None) -> None:
        self.verifier = build_verifier(spec)
        self.reward = reward or RewardConfig()

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        """One verifier batch for all `requests` (a model backend shares each image's prefix), then
        `aggregate` per image; results in request order."""
        images = resolve_images(requests)
        answers = self.verifier.answer_batch([(image, r.question_set) for image, r in zip(images, requests)])
        if len(answers) != len(requests):
            raise ValueError(f"verifier {self.verifier.name!r}: {len(answers)} answers for {len(requests)} images")
        out = []
        for r, scores in zip(requests, answers):
            try:
                audit = self.reward.aggregate(r.question_set, scores)
            except ValueError as e:      # garbage from the backend: the pool counts and retries it, then names it
                raise ValueError(f"verifier backend {self.verifier.name!r} answered garbage for sample {r.key!r}: "
                                 f"{e}") from None
            out.append(ScoreResult(key=r.key, reward=audit.reward, audit=audit, verifier=self.verifier.name))
        return out
