"""The reward actors' plain classes in-process (no cluster): the same numbers as DVReward, the cache first."""
import re

import numpy as np
import pytest

from actors.reward_workers import RewardServiceConfig
from reward_service.scoring import (DecomposerKeyError, DecomposerWorker, ScoreRequest, VerifierWorker, check_image,
                                    request_key)
from reward_service.backends import BackendSpec
from reward_service.backends.shapes_verifier import ShapesVerifier
from reward_service.cache import DecompositionCache
from reward_service.reward import DVReward, RewardConfig

SHAPES = BackendSpec(name="shapes")


class CountingDecomposer:
    """Wraps a decomposer and records every batch it is asked to decompose."""

    def __init__(self, inner):
        self.inner, self.version, self.batches = inner, inner.version, []

    def decompose_batch(self, requests):
        self.batches.append(list(requests))
        return self.inner.decompose_batch(requests)


def test_verifier_worker_scores_exactly_as_dvreward(make_samples):
    samples = make_samples(seed=1, per_family=1)
    config = RewardConfig(parent_rule="zero")
    worker = VerifierWorker(SHAPES, reward=config)
    sets = DecomposerWorker(SHAPES).decompose([r for r, _ in samples]).question_sets
    requests = [ScoreRequest(key=f"s{i}", image=image, question_set=qs)
                for i, ((_, image), qs) in enumerate(zip(samples, sets))]
    results = worker.score(requests)
    dv = DVReward(ShapesVerifier(), config=config)
    for request, result in zip(requests, results):
        expected = dv.score(request.image, request.question_set)
        assert result.key == request.key and result.verifier == "shapes"
        assert result.audit == expected and result.reward == expected.reward


def test_decomposer_worker_reads_the_cache_first_and_never_redecomposes(make_samples, tmp_path):
    requests = [r for r, _ in make_samples(seed=2, per_family=1)]
    first = DecomposerWorker(SHAPES, cache_path=str(tmp_path / "cache.sqlite"))
    made = first.decompose(requests)
    assert (made.cache_hits, made.decomposed) == (0, len(requests))
    restarted = DecomposerWorker(SHAPES, cache_path=str(tmp_path / "cache.sqlite"))   # a new actor, same file
    restarted.decomposer = spy = CountingDecomposer(restarted.decomposer)
    again = restarted.decompose(requests)
    assert (again.cache_hits, again.decomposed) == (len(requests), 0) and spy.batches == []
    assert again.question_sets == made.question_sets


def test_misses_are_decomposed_once_in_one_batch_and_stored(make_samples, tmp_path):
    requests = [r for r, _ in make_samples(seed=3, per_family=1)]
    worker = DecomposerWorker(SHAPES, cache_path=str(tmp_path / "cache.sqlite"))
    worker.decompose(requests[:3])
    worker.decomposer = spy = CountingDecomposer(worker.decomposer)
    result = worker.decompose(requests + requests[4:6])                 # 3 cached, 2 repeated
    assert len(spy.batches) == 1 and spy.batches[0] == requests[3:]
    assert (result.cache_hits, result.decomposed) == (3, len(requests) - 3)
    assert len(result.question_sets) == len(requests) + 2 and result.question_sets[-2:] == result.question_sets[4:6]
    assert len(DecompositionCache(tmp_path / "cache.sqlite")) == len(requests)


def test_a_set_keyed_differently_from_its_lookup_is_refused(make_samples, tmp_path):
    requests = [r for r, _ in make_samples(seed=4, per_family=1)][:2]
    worker = DecomposerWorker(SHAPES, cache_path=str(tmp_path / "cache.sqlite"))

    class TextOnlyKeys(CountingDecomposer):
        def key(self, request):                      # disagrees with how the shapes backend keys its sets
            return "text-only-" + request.prompt

    worker.decomposer = TextOnlyKeys(worker.decomposer)
    assert request_key(worker.decomposer, requests[0]) == "text-only-" + requests[0].prompt
    with pytest.raises(DecomposerKeyError, match=f"prompt {requests[0].prompt!r} was looked up as"):
        worker.decompose(requests)
    assert len(worker.cache) == 0


@pytest.mark.parametrize("image, what", [
    (np.zeros((32, 32, 3), dtype=np.float32), "float32 array (32, 32, 3)"),
    (np.zeros((32, 32), dtype=np.uint8), "uint8 array (32, 32)"),
    ([[0, 0, 0]], "list"),
])
def test_bad_images_are_refused_by_sample_key(image, what):
    with pytest.raises(ValueError, match=rf"score request 'step0/s3': image must be .* got {re.escape(what)}$"):
        check_image(image, key="step0/s3")


def test_reward_service_config_names_the_bad_key():
    with pytest.raises(ValueError, match="RewardServiceConfig.score_batch_size=0"):
        RewardServiceConfig(decomposer=SHAPES, verifier=SHAPES, score_batch_size=0)
