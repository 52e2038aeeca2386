"""The pool's decisions without a cluster: which actor gets a request, when it waits, retry bookkeeping."""
import pickle
import random

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from actors.pool import (ActorLoad, AttemptFailure, PendingRequest, PoolConfig, RequestsFailed, choose_actor,
                         failure_kind, plan_dispatch, short)


def loads(*in_flight, failures=None):
    failures = failures or [0] * len(in_flight)
    return [ActorLoad(in_flight=n, recent_failures=f) for n, f in zip(in_flight, failures)]


def test_choose_actor_takes_the_least_outstanding_then_the_lowest_index():
    assert choose_actor(loads(1, 0, 1), max_in_flight=2) == 1
    assert choose_actor(loads(1, 1, 1), max_in_flight=2) == 0
    assert choose_actor(loads(2, 2, 1), max_in_flight=2) == 2


def test_choose_actor_returns_none_when_every_actor_is_at_the_bound():
    assert choose_actor(loads(2, 2), max_in_flight=2) is None


def test_healthy_actors_come_first_even_when_busier():
    assert choose_actor(loads(0, 1, failures=[1, 0]), max_in_flight=2) == 1
    assert choose_actor(loads(0, 2, failures=[1, 0]), max_in_flight=2) == 0      # the healthy one is full


def test_a_retry_avoids_the_actors_it_failed_on_and_waits_for_another():
    assert choose_actor(loads(0, 1), max_in_flight=2, avoid=frozenset({0})) == 1
    assert choose_actor(loads(0, 2), max_in_flight=2, avoid=frozenset({0})) is None   # wait for actor 1
    assert choose_actor(loads(0, 2), max_in_flight=2, avoid=frozenset({0, 1})) == 0   # failed on all: any


def test_plan_dispatch_fills_actors_up_to_the_bound_in_queue_order():
    plan = plan_dispatch([frozenset()] * 7, loads(0, 1), max_in_flight=2)
    assert plan == [(0, 0), (1, 0), (2, 1)]


def test_a_request_that_must_wait_does_not_block_the_ones_behind_it():
    plan = plan_dispatch([frozenset({0}), frozenset(), frozenset()], loads(0, 2), max_in_flight=2)
    assert plan == [(1, 0), (2, 0)]


def test_plan_dispatch_never_exceeds_the_bound():
    rng = random.Random(0)
    for _ in range(500):
        n, bound = rng.randint(1, 4), rng.randint(1, 3)
        start = [ActorLoad(in_flight=rng.randint(0, bound), recent_failures=rng.randint(0, 2)) for _ in range(n)]
        avoid = [frozenset(a for a in range(n) if rng.random() < 0.3) for _ in range(rng.randint(0, 10))]
        plan = plan_dispatch(avoid, start, max_in_flight=bound)
        after = [s.in_flight for s in start]
        for position, actor in plan:
            after[actor] += 1
            assert actor not in avoid[position] or set(avoid[position]) >= set(range(n))
        assert all(x <= bound for x in after)
        assert [p for p, _ in plan] == sorted({p for p, _ in plan})                 # each request at most once
        free = sum(bound - s.in_flight for s in start)
        if len(plan) < min(free, len(avoid)):                                      # left room: only by avoidance
            unplaced = [a for p, a in enumerate(avoid) if p not in {q for q, _ in plan}]
            assert all(a for a in unplaced)


def test_retry_budget_counts_attempts_and_remembers_where_they_failed():
    request = PendingRequest(request_id=7, label="score ['s1']", method="score", args=())
    fail = [AttemptFailure(actor=a, kind=k, message="boom") for a, k in [(0, "actor"), (1, "timeout"), (0, "task")]]
    assert request.record_failure(fail[0], max_attempts=3) is True
    assert request.avoid == {0}
    assert request.record_failure(fail[1], max_attempts=3) is True
    assert request.record_failure(fail[2], max_attempts=3) is False
    failed = request.as_failed()
    assert failed.attempts == tuple(fail) and failed.label == "score ['s1']"
    assert "score ['s1']" in failed.describe() and "3 attempt(s) [actor, timeout, task]" in failed.describe()


def test_requests_failed_names_each_request_and_survives_pickling():
    failures = []
    for label in ("batch-a", "batch-b"):
        r = PendingRequest(request_id=0, label=label, method="score", args=())
        r.record_failure(AttemptFailure(actor=1, kind="task", message="ValueError: bad image"), max_attempts=1)
        failures.append(r.as_failed())
    error = RequestsFailed("verifier", failures, [None, 1.0, None])
    assert "'batch-a'" in str(error) and "'batch-b'" in str(error) and "ValueError: bad image" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert again.failures == error.failures and again.results == [None, 1.0, None]


def test_errors_are_classified_by_cause():
    assert failure_kind(RayTaskError("score", "Traceback ...", ValueError("bad image"))) == "task"
    assert failure_kind(ActorDiedError()) == "actor"
    assert failure_kind(ValueError("raised in the driver")) == "task"


def test_short_keeps_errors_to_one_bounded_line_with_their_end():
    text = short(ValueError("line one\n\n   line two\n" + "x" * 2000 + " the end"), limit=80)
    assert "\n" not in text and len(text) == 80
    assert text.startswith("ValueError: line one |") and text.endswith("x the end")


def test_short_reports_what_the_method_raised_not_the_remote_traceback():
    error = RayTaskError("score", "Traceback (most recent call last):\n  File ...\n" * 50, ValueError("bad image"))
    assert short(error) == "ValueError: bad image"


@pytest.mark.parametrize("key, value", [("num_actors", 0), ("max_in_flight", 0), ("timeout_s", 0.0),
                                        ("max_attempts", 0), ("ray_task_retries", -1), ("num_gpus", -1.0)])
def test_pool_config_names_the_bad_key(key, value):
    with pytest.raises(ValueError, match=f"PoolConfig.{key}="):
        PoolConfig(**{key: value})


def test_only_ready_actors_take_work_and_broken_ones_do_not_count_as_untried():
    starting = [ActorLoad(in_flight=0, state="starting"), ActorLoad(in_flight=1)]
    assert choose_actor(starting, max_in_flight=2) == 1
    assert choose_actor(starting, max_in_flight=2, avoid=frozenset({1})) is None       # wait for actor 0
    broken = [ActorLoad(in_flight=0, state="broken"), ActorLoad(in_flight=1)]
    assert choose_actor(broken, max_in_flight=2, avoid=frozenset({1})) == 1            # the only live one
    assert plan_dispatch([frozenset()] * 3, starting, max_in_flight=2) == [(0, 1)]
