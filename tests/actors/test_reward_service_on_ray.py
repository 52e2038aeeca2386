"""RewardService on a real local Ray cluster with the shapes backends: the pure DVReward's numbers
exactly, the cache on the second call, a verifier actor killed mid-batch, unscorable samples named."""
import threading
import time

import numpy as np
import pytest
import ray

from actors.pool import PoolConfig, RequestsFailed
from actors.reward_workers import RewardService, RewardServiceConfig
from reward_service.scoring import DecomposerWorker, ScoreRequest, VerifierWorker
from reward_service.backends import BackendSpec
from reward_service.backends.shapes_verifier import ShapesVerifier
from reward_service.reward import DVReward, RewardConfig
from reward_service.schema import Question, QuestionSet

pytestmark = pytest.mark.ray

SHAPES = BackendSpec(name="shapes")
REWARD = RewardConfig(parent_rule="zero")


def config(cache_path=None, *, ray_task_retries=0, max_attempts=3):
    pool = PoolConfig(num_actors=2, num_cpus=0.25, max_in_flight=2, timeout_s=60, max_attempts=max_attempts,
                      ray_task_retries=ray_task_retries)
    return RewardServiceConfig(decomposer=SHAPES, verifier=SHAPES, reward=REWARD, cache_path=cache_path,
                               decomposer_pool=PoolConfig(num_cpus=0.25), verifier_pool=pool,
                               decompose_batch_size=8, score_batch_size=2)


def pure_results(requests):
    dv = DVReward(ShapesVerifier(), config=REWARD)
    return [dv.score(np.asarray(r.image) if not isinstance(r.image, ray.ObjectRef) else ray.get(r.image),
                     r.question_set) for r in requests]


def score_requests(samples, sets, *, refs_every=2):
    """ScoreRequests for the samples; every `refs_every`-th image goes as an object-store ref."""
    return [ScoreRequest(key=f"s{i}", image=ray.put(image) if i % refs_every == 0 else image, question_set=qs)
            for i, ((_, image), qs) in enumerate(zip(samples, sets))]


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    with RewardService(config(str(tmp_path_factory.mktemp("cache") / "decompositions.sqlite"))) as s:
        s.wait_ready()
        yield s


def test_rewards_through_the_pools_equal_the_pure_dvreward(service, make_samples):
    samples = make_samples(seed=10, per_family=2)
    sets = service.decompose_many([r for r, _ in samples])
    assert tuple(sets) == DecomposerWorker(SHAPES).decompose([r for r, _ in samples]).question_sets
    requests = score_requests(samples, sets)
    results = service.score_many(requests)
    assert [r.key for r in results] == [r.key for r in requests]
    assert [r.audit for r in results] == pure_results(requests)          # dataclass equality: exact floats
    stats = service.stats().verifier_pool
    assert stats.max_in_flight_seen == (2, 2) and stats.retries == 0      # 9 calls queued behind a bound of 2


def test_the_second_call_reads_the_cache_and_decomposes_nothing(service, make_samples):
    requests = [r for r, _ in make_samples(seed=11, per_family=1)]
    distinct = len(set(requests))
    before = service.stats()
    first = service.decompose_many(requests + requests[:3])              # repeats are sent once
    middle = service.stats()
    second = service.decompose_many(requests)
    after = service.stats()
    assert first[:len(requests)] == second and first[len(requests):] == second[:3]
    assert middle.prompts - before.prompts == distinct
    assert (middle.decomposed - before.decomposed) + (middle.cache_hits - before.cache_hits) == distinct
    assert middle.decomposed > before.decomposed                         # (a few may be cached by the test above)
    assert (after.decomposed - middle.decomposed, after.cache_hits - middle.cache_hits) == (0, distinct)
    assert after.cache_hit_rate == after.cache_hits / (after.cache_hits + after.decomposed)


def test_unscorable_samples_raise_naming_them_and_are_counted_never_scored(service, make_samples):
    samples = make_samples(seed=12, per_family=1)[:6]
    sets = service.decompose_many([r for r, _ in samples])
    requests = score_requests(samples, sets)
    qs = requests[1].question_set
    no_atom = QuestionSet(prompt=qs.prompt, prompt_hash=qs.prompt_hash, version=qs.version,
                          questions=qs.questions + (Question(id="x", text="is it pretty?", kind="quality",
                                                             category="aesthetics"),))
    requests[1] = ScoreRequest(key="bad-questions", image=requests[1].image, question_set=no_atom)
    requests[4] = ScoreRequest(key="bad-image", image=np.zeros((32, 32, 3), np.float32),
                               question_set=requests[4].question_set)
    before = service.stats()
    with pytest.raises(RequestsFailed) as info:
        service.score_many(requests)
    message = str(info.value)
    assert "'bad-questions'" in message and "question 'x'" in message and "no shapes atom" in message
    assert "'bad-image'" in message and "must be a uint8 array" in message
    assert all(len(f.attempts) == 3 for f in info.value.failures)
    results = info.value.results                                         # batches of 2: [0 1] [2 3] [4 5]
    assert [r is None for r in results] == [True, True, False, False, True, True]
    assert [r.audit for r in results[2:4]] == pure_results(requests[2:4])
    after = service.stats()
    assert after.images_failed - before.images_failed == 4
    assert after.failed_requests - before.failed_requests == 2 and after.retries - before.retries == 4


class SlowVerifierWorker(VerifierWorker):
    """VerifierWorker that takes 0.4 s per call, so that calls are surely running when an actor is killed."""

    def score(self, requests):
        time.sleep(0.4)
        return super().score(requests)


@pytest.mark.parametrize("ray_task_retries", [0, 1])
def test_a_verifier_actor_killed_mid_batch_changes_no_score(ray_cluster, make_samples, ray_task_retries):
    samples = make_samples(seed=13, per_family=2)
    with RewardService(config(ray_task_retries=ray_task_retries), verifier_worker=SlowVerifierWorker) as service:
        requests = score_requests(samples, service.decompose_many([r for r, _ in samples]))
        service.verifier_pool.wait_ready()
        at_kill = {}

        def kill_actor_0():
            time.sleep(0.6)                                              # two calls into the batch
            at_kill["in_flight"] = service.verifier_pool.in_flight_per_actor()
            ray.kill(service.verifier_pool.actors[0], no_restart=False)

        killer = threading.Thread(target=kill_actor_0)
        killer.start()
        results = service.score_many(requests)                           # 9 calls of 0.4 s on 2 actors
        killer.join()
        stats = service.stats().verifier_pool
    assert at_kill["in_flight"][0] > 0
    assert [r.audit for r in results] == pure_results(requests)
    assert stats.failed == 0
    if ray_task_retries == 0:                                            # the pool saw the death and retried
        assert stats.failures_by_kind["actor"] >= 1 and stats.retries >= 1
