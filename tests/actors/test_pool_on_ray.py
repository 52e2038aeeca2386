"""ActorPool on a real local Ray cluster, with a toy worker: order, backpressure, failures, timeouts."""
import os
import time

import pytest

from actors.pool import ActorPool, PoolConfig, RequestsFailed

pytestmark = pytest.mark.ray


class EchoWorker:
    """A toy worker whose calls succeed, fail, or hang on demand."""

    def echo(self, x, delay_s=0.0):
        time.sleep(delay_s)
        return x

    def fail(self, x):
        raise ValueError(f"cannot process {x!r}")

    def hang_the_first_time(self, marker: str, x):
        """Hangs on the first call with this marker (any actor), answers afterwards."""
        if not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(120)
        return x


@pytest.fixture(scope="module")
def pool(ray_cluster):
    config = PoolConfig(num_actors=2, num_cpus=0.25, max_in_flight=2, timeout_s=60, max_attempts=3,
                        ray_task_retries=0)
    with ActorPool(EchoWorker, config=config, name="echo") as p:
        p.wait_ready()
        yield p


def test_results_come_back_in_order_and_the_in_flight_bound_holds(pool):
    ids = [pool.submit(EchoWorker.echo, i, 0.05, label=f"echo-{i}") for i in range(12)]
    assert pool.stats().in_flight == 4 and pool.stats().queued == 8          # the rest wait, queued
    seen = []
    done: set[int] = set()
    while len(done) < len(ids):
        done |= set(pool.poll(timeout_s=1.0))
        seen.append(pool.in_flight_per_actor())
    assert all(max(counts) <= 2 for counts in seen)
    assert [o.value for o in pool.collect(ids)] == list(range(12))
    assert pool.stats().max_in_flight_seen == (2, 2)                         # instrumented: reached, never passed


def test_a_request_that_always_fails_raises_naming_it_after_its_budget(pool):
    before = pool.stats()
    with pytest.raises(RequestsFailed) as info:
        pool.map(EchoWorker.fail, [("bad",)], labels=["sample bad-one"])
    assert "sample bad-one" in str(info.value) and "cannot process 'bad'" in str(info.value)
    (failed,) = info.value.failures
    assert [a.kind for a in failed.attempts] == ["task"] * 3
    assert {a.actor for a in failed.attempts} == {0, 1}                     # the retry went to the other actor
    after = pool.stats()
    assert (after.failed - before.failed, after.retries - before.retries) == (1, 2)


def test_other_requests_complete_and_the_failed_one_has_no_value(pool):
    with pytest.raises(RequestsFailed) as info:
        pool.map(EchoWorker.echo, [(1,), ("x", "not a number")], labels=["ok", "bad-delay"])
    assert info.value.results == [1, None]
    assert [f.label for f in info.value.failures] == ["bad-delay"]


def test_submit_accepts_only_functions_of_the_worker_class(pool):
    with pytest.raises(TypeError, match="is not a method of EchoWorker"):
        pool.submit(lambda x: x, 1)


def test_a_timed_out_call_restarts_its_actor_and_succeeds_elsewhere(ray_cluster, tmp_path):
    config = PoolConfig(num_actors=2, num_cpus=0.25, max_in_flight=1, timeout_s=3.0, max_attempts=2)
    with ActorPool(EchoWorker, config=config, name="echo-timeout") as pool:
        (outcome,) = pool.collect([pool.submit(EchoWorker.hang_the_first_time, str(tmp_path / "marker"), "x")])
        stats = pool.stats()
    assert outcome.value == "x" and outcome.attempts == 2
    assert stats.failures_by_kind["timeout"] == 1 and stats.restarts == 1 and stats.retries == 1


class BrokenWorker:
    def __init__(self):
        raise RuntimeError("model file missing")

    def echo(self, x):
        return x


def test_an_actor_whose_constructor_raises_fails_requests_with_its_error(ray_cluster):
    with ActorPool(BrokenWorker, config=PoolConfig(num_cpus=0.25), name="broken") as pool:
        with pytest.raises(RuntimeError, match="actor 0: .*model file missing"):
            pool.wait_ready()
        with pytest.raises(RequestsFailed, match="'echo#0'.*no live actor.*model file missing"):
            pool.map(BrokenWorker.echo, [(1,)])
        assert pool.stats().actor_states == ("broken",)
