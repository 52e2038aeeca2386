"""DVReward's actor classes and the facade the trainer calls.

    prompts ──► RewardService.decompose_many ──► DecomposerWorker ×N   cache first; misses decomposed
                                                                        in one batch and stored
    (image or image ref, question set) ──► RewardService.score_many ──► VerifierWorker ×M
                                                  answers for a batch -> reward + audit (RewardResult)
`DecomposerWorker` and `VerifierWorker` are plain classes: they run in-process as they are (tests,
the sync baseline) and `actors.pool.ActorPool` turns them into Ray actors (nothing else added).
`RewardService` owns one pool of each and returns results in input order; a sample whose reward
cannot be computed within the retry budget raises `RequestsFailed` naming it, and is counted:
it is never scored with a default.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from actors.pool import ActorPool, PoolConfig, PoolStats, RequestsFailed
from reward_service.aggregate import RewardResult, aggregate
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
    """The requests' images, fetching object refs from the object store in one call, checked."""
    refs = [r.image for r in requests if isinstance(r.image, ray.ObjectRef)]
    fetched = iter(ray.get(refs) if refs else [])
    images = [next(fetched) if isinstance(r.image, ray.ObjectRef) else r.image for r in requests]
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
            audit = aggregate(r.question_set, scores, mode=self.reward.mode, parent_rule=self.reward.parent_rule,
                              fail_below=self.reward.fail_below)
            out.append(ScoreResult(key=r.key, reward=audit.reward, audit=audit, verifier=self.verifier.name))
        return out


# ---- the facade ------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class RewardServiceConfig:
    """The two pools and what they run."""
    decomposer: BackendSpec                       # e.g. BackendSpec(name="shapes")
    verifier: BackendSpec
    reward: RewardConfig = field(default_factory=RewardConfig)
    cache_path: str | None = None                 # SQLite decomposition cache shared by the decomposer actors
    decomposer_pool: PoolConfig = field(default_factory=PoolConfig)
    verifier_pool: PoolConfig = field(default_factory=lambda: PoolConfig(num_actors=2))
    decompose_batch_size: int = 64                # prompts per decomposer call
    score_batch_size: int = 8                     # images per verifier call: the unit that is retried or fails

    def __post_init__(self) -> None:
        for key in ("decompose_batch_size", "score_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"RewardServiceConfig.{key}={getattr(self, key)!r}: must be >= 1")


@dataclass(frozen=True, kw_only=True)
class RewardServiceStats:
    """Counters since the service started; retries and failures per pool are in the pool stats."""
    prompts: int                   # distinct prompts sent to the decomposer pool
    cache_hits: int                # of those, found in the cache
    decomposed: int                # of those, decomposed by the backend
    cache_hit_rate: float          # cache_hits / (cache_hits + decomposed); 0.0 before any
    images: int                    # score requests received
    images_scored: int
    images_failed: int             # in verifier calls that used up their retries: raised, never scored
    decomposer_pool: PoolStats
    verifier_pool: PoolStats

    @property
    def retries(self) -> int:
        """Attempts beyond the first, both pools."""
        return self.decomposer_pool.retries + self.verifier_pool.retries

    @property
    def failed_requests(self) -> int:
        """Pool requests (batches) that used up their attempts, both pools."""
        return self.decomposer_pool.failed + self.verifier_pool.failed


def _chunks(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _distinct(items: Sequence[Any]) -> tuple[list[Any], list[int]]:
    """The distinct items in first-seen order, and each item's index among them (all distinct when
    some item is unhashable)."""
    index: dict[Any, int] = {}
    try:
        where = [index.setdefault(x, len(index)) for x in items]
    except TypeError:
        return list(items), list(range(len(items)))
    return list(index), where


def _label(kind: str, names: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"{kind} [{shown}{', …' if len(names) > limit else ''}] ({len(names)})"


class RewardService:
    """DVReward as two Ray actor pools: `decompose_many` (prompts -> question sets) and `score_many`
    (images + question sets -> rewards with audit records). Needs `ray.init()` first; call
    `shutdown()` (or use it as a context manager) to free the actors.

    `decomposer_worker` / `verifier_worker`: the plain classes the actors run (subclasses may add
    instrumentation; the fault-injection test uses a deliberately slow verifier)."""

    def __init__(self, config: RewardServiceConfig, *, decomposer_worker: type = DecomposerWorker,
                 verifier_worker: type = VerifierWorker) -> None:
        self.config = config
        self._decompose = decomposer_worker.decompose
        self._score = verifier_worker.score
        self.decomposer_pool = ActorPool(decomposer_worker, config=config.decomposer_pool, name="decomposer",
                                         init_args=(config.decomposer,), init_kwargs={"cache_path": config.cache_path})
        self.verifier_pool = ActorPool(verifier_worker, config=config.verifier_pool, name="verifier",
                                       init_args=(config.verifier,), init_kwargs={"reward": config.reward})
        self._counts = {"prompts": 0, "cache_hits": 0, "decomposed": 0, "images": 0, "images_scored": 0,
                        "images_failed": 0}

    def wait_ready(self) -> None:
        """Block until every actor has started (models loaded); raise naming any whose constructor failed."""
        self.decomposer_pool.wait_ready()
        self.verifier_pool.wait_ready()

    def decompose_many(self, prompts: Sequence[DecomposeRequest]) -> list[QuestionSet]:
        """One question set per prompt, in order (repeated prompts are decomposed once). Raises
        `RequestsFailed` naming the prompts of any decomposer call that used up its retries."""
        distinct, where = _distinct(prompts)
        batches = _chunks(distinct, self.config.decompose_batch_size)
        labels = [_label("decompose", [r.prompt for r in b]) for b in batches]
        results: list[DecomposeResult] = self.decomposer_pool.map(self._decompose, [(b,) for b in batches],
                                                                  labels=labels)
        sets = [qs for res in results for qs in res.question_sets]
        self._counts["prompts"] += len(distinct)
        self._counts["cache_hits"] += sum(r.cache_hits for r in results)
        self._counts["decomposed"] += sum(r.decomposed for r in results)
        return [sets[i] for i in where]

    def score_many(self, items: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """One result per item, in order. Raises `RequestsFailed` naming the samples of any verifier
        call that used up its retries; its `results` holds the others' ScoreResults (None where failed)."""
        batches = _chunks(items, self.config.score_batch_size)
        ids = [self.verifier_pool.submit(self._score, b, label=_label("score", [r.key for r in b])) for b in batches]
        outcomes = self.verifier_pool.collect(ids)
        results: list[ScoreResult | None] = []
        for batch, outcome in zip(batches, outcomes):
            results += outcome.value if outcome.ok else [None] * len(batch)
        failed = sum(1 for r in results if r is None)
        self._counts["images"] += len(items)
        self._counts["images_scored"] += len(items) - failed
        self._counts["images_failed"] += failed
        if failed:
            raise RequestsFailed("verifier", [o.failure for o in outcomes if not o.ok], results)
        return results

    def stats(self) -> RewardServiceStats:
        looked_up = self._counts["cache_hits"] + self._counts["decomposed"]
        return RewardServiceStats(**self._counts,
                                  cache_hit_rate=self._counts["cache_hits"] / looked_up if looked_up else 0.0,
                                  decomposer_pool=self.decomposer_pool.stats(),
                                  verifier_pool=self.verifier_pool.stats())

    def shutdown(self) -> None:
        self.decomposer_pool.shutdown()
        self.verifier_pool.shutdown()

    def __enter__(self) -> "RewardService":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
