"""DVReward's actor classes and the facade the trainer calls.

    prompts ──► RewardService.decompose_many ──► DecomposerWorker ×N   cache first; misses decomposed
                                                                        in one batch and stored
    (image or image ref, question set) ──► RewardService.score_many ──► VerifierWorker ×M
                                                  answers for a batch -> reward + audit (RewardResult)
`DecomposerWorker` and `VerifierWorker` are the plain classes of `reward_service.scoring` (the sync
baseline runs them in-process); `actors.pool.ActorPool` turns them into Ray actors (nothing added).
`RewardService` owns one pool of each and returns results in input order; a sample whose reward
cannot be computed within the retry budget raises `RequestsFailed` naming it, and is counted:
it is never scored with a default.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.pool import ActorPool, PoolConfig, PoolStats, RequestsFailed
from reward_service.backends import BackendSpec, DecomposeRequest
from reward_service.reward import RewardConfig
from reward_service.schema import QuestionSet
from reward_service.scoring import DecomposeResult, DecomposerWorker, ScoreRequest, ScoreResult, VerifierWorker


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
