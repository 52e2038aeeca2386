"""A pool of Ray actors over one plain worker class, with backpressure, timeouts and retries.

    submit(Worker.method, *args) ─► queue ─► the actor with the fewest calls in flight
                                      ▲        (at most `max_in_flight` per actor: the rest wait queued)
                                      │                       │
                                      └─ retry, on an actor ◄─┤ attempt failed: the actor died or is
                                         it has not failed on │ restarting, the call timed out, or
                                                              │ the method raised
                                          final ◄─────────────┘ value, or `FailedRequest` once the
                                                                request has used `max_attempts`
A request that runs out of attempts is an error naming it (`RequestsFailed` from `map`), never a
default value. Actors are created with `max_restarts=-1` (Ray restarts a dead one) and
`max_task_retries=config.ray_task_retries` (0 by default: see PoolConfig). Each actor is "starting"
until it answers Ray's built-in `__ray_ready__` probe, and again after it failed or was restarted,
so no work (and no timeout clock) goes to an actor that is loading its model or restarting; one
whose constructor raises is "broken" and never used. A call that times out makes the pool kill its
actor, which Ray restarts, so a hung call cannot hold a slot.

The pool is driven by its caller, from one thread: `poll` dispatches queued requests, waits for
results and handles failures; `collect` and `map` poll until their requests are final. Methods are
named by the plain class's function (`pool.submit(VerifierWorker.score, batch)`), never by a string.
The decisions (which actor, retry or fail) are plain functions and records below the config,
tested without a cluster; the Ray calls are confined to `ActorPool`. (~500 lines: the records, the
decisions and the loop that applies them are meant to be read together, in that order.)
"""
from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import ray
from ray.exceptions import ActorDiedError, RayError, RayTaskError

FAILURE_KINDS: tuple[str, ...] = ("actor", "timeout", "task")
# actor:   the actor died, is restarting, or was unreachable (RayActorError and other system errors)
# timeout: no result within timeout_s of dispatch (the pool then restarts that actor)
# task:    the method itself raised (RayTaskError); retried too, since the cause may be transient


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """How many actors, what each reserves, and how requests are dispatched and retried."""
    num_actors: int = 1            # actors in the pool
    num_cpus: float = 1.0          # CPUs Ray reserves per actor
    num_gpus: float = 0.0          # GPUs Ray reserves per actor (fractions share a device)
    max_in_flight: int = 2         # calls dispatched to one actor and not yet finished (backpressure)
    timeout_s: float = 300.0       # per attempt, from dispatch; covers waiting behind the actor's
    #                                other in-flight calls (an actor runs one call at a time)
    max_attempts: int = 3          # attempts per request, the first included (1 = never retry)
    start_timeout_s: float = 600.0 # an actor not answering this long after its (re)start is broken
    env: dict[str, str] = field(default_factory=dict)   # the actors' environment variables (Ray runtime_env)
    ray_task_retries: int = 0      # max_task_retries: Ray's own re-runs of a call whose actor died.
    #   0 (default): every failure reaches the pool, which counts it and retries on another actor
    #   at once; > 0: Ray waits for the restart and re-runs the call on the same actor, invisible
    #   to the pool's counters, and timeout_s must then also cover the actor's restart.

    def __post_init__(self) -> None:
        checks = {"num_actors": self.num_actors >= 1, "num_cpus": self.num_cpus >= 0,
                  "num_gpus": self.num_gpus >= 0, "max_in_flight": self.max_in_flight >= 1,
                  "timeout_s": self.timeout_s > 0, "max_attempts": self.max_attempts >= 1,
                  "start_timeout_s": self.start_timeout_s > 0,
                  "ray_task_retries": self.ray_task_retries >= 0}
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"PoolConfig.{key}={getattr(self, key)!r}: out of range")


# ---- records --------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class AttemptFailure:
    """One failed attempt of a request."""
    actor: int                     # index of the actor it ran on
    kind: str                      # one of FAILURE_KINDS
    message: str                   # the error, shortened


@dataclass(frozen=True, kw_only=True)
class FailedRequest:
    """A request that used up its attempts: what it was and why each attempt failed."""
    request_id: int
    label: str                     # the caller's name for it (e.g. the samples it scores)
    method: str
    attempts: tuple[AttemptFailure, ...]

    def describe(self) -> str:
        last = self.attempts[-1]
        kinds = ", ".join(a.kind for a in self.attempts)
        return (f"request {self.label!r} ({self.method}) failed {len(self.attempts)} attempt(s) [{kinds}]; "
                f"last on actor {last.actor}: {last.message}")


@dataclass(frozen=True, kw_only=True)
class RequestOutcome:
    """The final state of one request: its value, or why it failed."""
    request_id: int
    label: str
    value: Any = None              # the method's return value (None when it failed)
    failure: FailedRequest | None = None
    attempts: int                  # attempts made, the successful one included
    actor: int | None = None       # the actor that produced the value

    @property
    def ok(self) -> bool:
        return self.failure is None


class RequestsFailed(RuntimeError):
    """Requests that could not be computed within their retry budget; the message names each one.

    `failures` lists them; `results` holds what did complete, in input order (None where failed)."""

    def __init__(self, pool: str, failures: Sequence[FailedRequest], results: list[Any]) -> None:
        self.pool = pool
        self.failures = tuple(failures)
        self.results = results
        lines = "\n  ".join(f.describe() for f in self.failures)
        super().__init__(f"pool {pool!r}: {len(self.failures)} request(s) failed after retries:\n  {lines}")

    def __reduce__(self):
        return (RequestsFailed, (self.pool, self.failures, self.results))


@dataclass(frozen=True, kw_only=True)
class PoolStats:
    """Counters since the pool started (for logs and tests)."""
    name: str
    actors: int
    submitted: int                 # requests
    succeeded: int
    failed: int                    # requests that used up their attempts (raised, never defaulted)
    retries: int                   # attempts beyond each request's first
    failures_by_kind: dict[str, int]   # failed attempts per FAILURE_KINDS entry
    restarts: int                  # actors the pool killed for Ray to restart (after a timeout)
    max_in_flight_seen: tuple[int, ...]  # per actor: the most calls it ever had in flight
    actor_states: tuple[str, ...]  # now, per actor: one of ACTOR_STATES
    queued: int                    # now: waiting for an actor
    in_flight: int                 # now: dispatched, not finished


# ---- decisions (plain functions; no Ray) -----------------------------------------------------------

ACTOR_STATES: tuple[str, ...] = ("starting", "ready", "broken")
# starting: created or restarting; probed until it answers (no work is sent to it meanwhile)
# ready:    answering; takes work
# broken:   its constructor raised, or it was not ready within start_timeout_s; never used again


@dataclass(frozen=True, kw_only=True)
class ActorLoad:
    """What dispatch knows about one actor."""
    in_flight: int                 # calls dispatched and not finished
    recent_failures: int = 0       # consecutive attempts lost on it (actor errors, timeouts); 0 after a success
    state: str = "ready"           # one of ACTOR_STATES


def _has_room(load: ActorLoad, max_in_flight: int) -> bool:
    return load.state == "ready" and load.in_flight < max_in_flight


def choose_actor(loads: Sequence[ActorLoad], *, max_in_flight: int, avoid: frozenset[int] = frozenset()) -> int | None:
    """The actor for the next attempt of a request, or None to keep it queued.

    Candidates are ready, have room (in_flight < max_in_flight) and are not in `avoid` (actors the
    request already failed on) — unless it failed on every actor that is not broken, then any ready
    one with room. Among candidates: fewest recent failures (healthy first), then fewest calls in
    flight (least outstanding), then lowest index."""
    live = [i for i, load in enumerate(loads) if load.state != "broken"]
    room = [i for i in live if _has_room(loads[i], max_in_flight)]
    fresh = [i for i in room if i not in avoid]
    if not fresh and all(i in avoid for i in live):
        fresh = room
    if not fresh:
        return None
    return min(fresh, key=lambda i: (loads[i].recent_failures, loads[i].in_flight, i))


def plan_dispatch(avoid_sets: Sequence[frozenset[int]], loads: Sequence[ActorLoad], *,
                  max_in_flight: int) -> list[tuple[int, int]]:
    """(queue position, actor) for the queued requests that can start now, in queue order.

    A request that must wait for an actor it has not failed on is skipped, not allowed to block
    the requests behind it; planning stops when no ready actor has room."""
    loads = list(loads)
    plan = []
    for position, avoid in enumerate(avoid_sets):
        if not any(_has_room(load, max_in_flight) for load in loads):
            break
        actor = choose_actor(loads, max_in_flight=max_in_flight, avoid=avoid)
        if actor is not None:
            plan.append((position, actor))
            loads[actor] = replace(loads[actor], in_flight=loads[actor].in_flight + 1)
    return plan


@dataclass(kw_only=True)
class PendingRequest:
    """A request not yet final, with its retry bookkeeping."""
    request_id: int
    label: str
    method: str
    args: tuple
    failures: list[AttemptFailure] = field(default_factory=list)

    @property
    def avoid(self) -> frozenset[int]:
        """Actors this request has failed on."""
        return frozenset(f.actor for f in self.failures)

    def record_failure(self, failure: AttemptFailure, *, max_attempts: int) -> bool:
        """Note a failed attempt; True if the request may be retried, False if it is now failed."""
        self.failures.append(failure)
        return len(self.failures) < max_attempts

    def as_failed(self) -> FailedRequest:
        return FailedRequest(request_id=self.request_id, label=self.label, method=self.method,
                             attempts=tuple(self.failures))


def failure_kind(error: BaseException) -> str:
    """"task" when the method raised, "actor" for Ray's system errors (actor died/unavailable, ...)."""
    if isinstance(error, RayTaskError) or not isinstance(error, RayError):
        return "task"
    return "actor"


def short(error: BaseException | str, limit: int = 600) -> str:
    """An error as one bounded line: what the method raised, not Ray's wrapper around it (whose text
    is the whole remote traceback); when too long, its start and its end (where the error is)."""
    cause = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
    error = cause if isinstance(cause, BaseException) else error
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    text = " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    if len(text) <= limit:
        return text
    head = (limit - 5) // 3
    return text[:head] + " ... " + text[-(limit - 5 - head):]


# ---- the pool ---------------------------------------------------------------------------------------

PROBE_INTERVAL_S = 0.25            # between readiness probes of a restarting actor


@dataclass(kw_only=True)
class _Attempt:
    request: PendingRequest
    actor: int
    started: float                 # time.monotonic() at dispatch


@dataclass(kw_only=True)
class _ActorState:
    handle: Any
    load: ActorLoad
    since: float                   # when it entered its current state
    probe: Any = None              # ObjectRef of the pending readiness probe
    probe_at: float = 0.0          # when to send the next probe (starting, no probe pending)
    reason: str = ""               # why it is broken
    max_seen: int = 0              # the most calls it had in flight at once


class ActorPool:
    """`config.num_actors` Ray actors of `worker_cls(*init_args, **init_kwargs)`; see the module docstring."""

    def __init__(self, worker_cls: type, *, config: PoolConfig, name: str | None = None,
                 init_args: tuple = (), init_kwargs: dict[str, Any] | None = None) -> None:
        self.worker_cls = worker_cls
        self.config = config
        self.name = name or worker_cls.__name__
        env = {"runtime_env": {"env_vars": dict(config.env)}} if config.env else {}
        options = dict(num_cpus=config.num_cpus, num_gpus=config.num_gpus, max_restarts=-1,
                       max_task_retries=config.ray_task_retries, max_concurrency=1, **env)
        actor_cls = ray.remote(worker_cls)
        now = time.monotonic()
        tag = uuid.uuid4().hex[:4]          # names read well on the dashboard, unique per pool
        self._actors = [_ActorState(handle=actor_cls.options(name=f"{self.name}-{i}-{tag}", **options)
                                    .remote(*init_args, **(init_kwargs or {})),
                                    load=ActorLoad(in_flight=0, state="starting"), since=now)
                        for i in range(config.num_actors)]
        self._queue: deque[PendingRequest] = deque()
        self._in_flight: dict[Any, _Attempt] = {}
        self._outcomes: dict[int, RequestOutcome] = {}
        self._next_id = 0
        self._counts = {"submitted": 0, "succeeded": 0, "failed": 0, "retries": 0, "restarts": 0}
        self._failures_by_kind = {kind: 0 for kind in FAILURE_KINDS}
        self._send_probes(now)

    # ---- public API ----------------------------------------------------------------------------
    @property
    def actors(self) -> tuple[Any, ...]:
        """The actor handles, by index (for monitoring and fault-injection tests)."""
        return tuple(a.handle for a in self._actors)

    def in_flight_per_actor(self) -> tuple[int, ...]:
        return tuple(a.load.in_flight for a in self._actors)

    def wait_ready(self) -> None:
        """Block until no actor is starting; raise if any is broken (e.g. its constructor raised)."""
        while any(a.load.state == "starting" for a in self._actors):
            self.poll(timeout_s=PROBE_INTERVAL_S)
        broken = [f"actor {i}: {a.reason}" for i, a in enumerate(self._actors) if a.load.state == "broken"]
        if broken:
            raise RuntimeError(f"pool {self.name!r} ({self.worker_cls.__name__}): " + "; ".join(broken))

    def submit(self, method: Callable, *args: Any, label: str | None = None) -> int:
        """Queue `method(*args)` (a function of the worker class) and start it if a ready actor has
        room; returns the request id for `collect`. Never blocks: the rest wait queued."""
        name = getattr(method, "__name__", None)
        if name is None or getattr(self.worker_cls, name, None) is not method:
            raise TypeError(f"pool {self.name!r}: {method!r} is not a method of {self.worker_cls.__name__}; "
                            f"pass it as {self.worker_cls.__name__}.<method>")
        request_id = self._next_id
        self._next_id += 1
        self._queue.append(PendingRequest(request_id=request_id, label=label or f"{name}#{request_id}",
                                          method=name, args=args))
        self._counts["submitted"] += 1
        self._dispatch()
        return request_id

    def poll(self, timeout_s: float = 0.0) -> list[int]:
        """Start queued requests, wait up to `timeout_s` for a result or probe, handle results,
        failures, timeouts and restarts; returns the ids of requests that became final."""
        finished = self._dispatch()
        now = time.monotonic()
        probes = {a.probe: i for i, a in enumerate(self._actors) if a.probe is not None}
        wake = [now + timeout_s] + [a.started + self.config.timeout_s for a in self._in_flight.values()]
        wake += [a.probe_at for a in self._actors if a.load.state == "starting" and a.probe is None]
        refs = list(self._in_flight) + list(probes)
        if refs:
            ready, rest = ray.wait(refs, num_returns=1, timeout=max(0.0, min(wake) - now))
            if ready and rest:
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        else:
            time.sleep(max(0.0, min(wake) - now))
            ready = []
        for ref in ready:
            if ref in probes:
                self._settle_probe(probes[ref], ref)
            else:
                finished += self._settle(ref)
        now = time.monotonic()
        finished += self._expire(now)
        finished += self._check_starting(now)
        self._send_probes(now)
        finished += self._dispatch()
        return finished

    def collect(self, request_ids: Sequence[int]) -> list[RequestOutcome]:
        """Block until every given request is final; their outcomes in the given order (each
        returned once: collected outcomes are forgotten)."""
        unknown = {i for i in request_ids if not 0 <= i < self._next_id}
        if unknown:
            raise KeyError(f"pool {self.name!r}: unknown request ids {sorted(unknown)}")
        waiting = set(request_ids) - set(self._outcomes)
        while waiting:
            waiting -= set(self.poll(timeout_s=1.0))
        outcomes = {i: self._outcomes.pop(i) for i in dict.fromkeys(request_ids)}
        return [outcomes[i] for i in request_ids]

    def map(self, method: Callable, args_list: Sequence[tuple], *, labels: Sequence[str] | None = None) -> list[Any]:
        """`method(*args)` for each args tuple, results in order; raises `RequestsFailed` naming
        every request that used up its attempts (after all the others finished)."""
        if labels is not None and len(labels) != len(args_list):
            raise ValueError(f"pool {self.name!r}: {len(labels)} labels for {len(args_list)} requests")
        ids = [self.submit(method, *args, label=None if labels is None else labels[i])
               for i, args in enumerate(args_list)]
        outcomes = self.collect(ids)
        failures = [o.failure for o in outcomes if o.failure is not None]
        if failures:
            raise RequestsFailed(self.name, failures, [o.value for o in outcomes])
        return [o.value for o in outcomes]

    def stats(self) -> PoolStats:
        return PoolStats(name=self.name, actors=len(self._actors), **self._counts,
                         failures_by_kind=dict(self._failures_by_kind),
                         max_in_flight_seen=tuple(a.max_seen for a in self._actors),
                         actor_states=tuple(a.load.state for a in self._actors),
                         queued=len(self._queue), in_flight=len(self._in_flight))

    def shutdown(self) -> None:
        """Kill the actors for good (no restart); queued and in-flight requests are dropped."""
        for actor in self._actors:
            try:
                ray.kill(actor.handle, no_restart=True)
            except (RayError, ValueError):
                pass
        self._actors = []
        self._queue.clear()
        self._in_flight.clear()

    def __enter__(self) -> "ActorPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- actor health ----------------------------------------------------------------------------
    def _set_state(self, i: int, state: str, now: float, *, reason: str = "") -> None:
        actor = self._actors[i]
        actor.load = replace(actor.load, state=state)
        actor.since, actor.probe, actor.probe_at, actor.reason = now, None, now, reason

    def _send_probes(self, now: float) -> None:
        for actor in self._actors:            # __ray_ready__: Ray's built-in no-op method of every actor
            if actor.load.state == "starting" and actor.probe is None and now >= actor.probe_at:
                actor.probe = actor.handle.__ray_ready__.remote()

    def _settle_probe(self, i: int, ref: Any) -> None:
        actor, now = self._actors[i], time.monotonic()
        if actor.probe is not ref:            # stale: the actor was restarted since this probe was sent
            return
        try:
            ray.get(ref)
        except ActorDiedError as e:          # its constructor raised, or it is dead for good
            self._set_state(i, "broken", now, reason=short(e))
            return
        except RayError:                     # still restarting: probe again shortly
            actor.probe, actor.probe_at = None, now + PROBE_INTERVAL_S
            return
        self._set_state(i, "ready", now)

    def _check_starting(self, now: float) -> list[int]:
        """Declare actors broken that stayed starting too long; fail the queue if none is left."""
        for i, actor in enumerate(self._actors):
            if actor.load.state == "starting" and now - actor.since > self.config.start_timeout_s:
                reason = f"not ready within start_timeout_s={self.config.start_timeout_s}s (resources? `ray status`)"
                self._set_state(i, "broken", now, reason=reason)
        if any(a.load.state != "broken" for a in self._actors):
            return []
        reasons = "; ".join(f"actor {i}: {a.reason}" for i, a in enumerate(self._actors))
        finished = []
        while self._queue:
            request = self._queue.popleft()
            request.failures.append(AttemptFailure(actor=-1, kind="actor", message=f"no live actor ({reasons})"))
            self._failures_by_kind["actor"] += 1
            finished += self._finish_failed(request)
        return finished

    def _restart(self, i: int, now: float) -> None:
        """Kill actor i so that Ray restarts it (abandoning its calls); probe it until it answers."""
        ray.kill(self._actors[i].handle, no_restart=False)
        self._counts["restarts"] += 1
        self._set_state(i, "starting", now)
        self._actors[i].probe_at = now + PROBE_INTERVAL_S

    # ---- requests --------------------------------------------------------------------------------
    def _add_in_flight(self, i: int, delta: int) -> None:
        actor = self._actors[i]
        actor.load = replace(actor.load, in_flight=actor.load.in_flight + delta)
        actor.max_seen = max(actor.max_seen, actor.load.in_flight)

    def _dispatch(self) -> list[int]:
        finished: list[int] = []
        plan = plan_dispatch([r.avoid for r in self._queue], [a.load for a in self._actors],
                             max_in_flight=self.config.max_in_flight)
        queued = list(self._queue)
        for position, i in plan:
            request = queued[position]
            self._queue.remove(request)
            try:
                ref = getattr(self._actors[i].handle, request.method).remote(*request.args)
            except RayError as e:             # the handle refuses calls
                finished += self._fail(request, AttemptFailure(actor=i, kind="actor", message=short(e)))
                continue
            self._in_flight[ref] = _Attempt(request=request, actor=i, started=time.monotonic())
            self._add_in_flight(i, +1)
        return finished

    def _settle(self, ref: Any) -> list[int]:
        attempt = self._in_flight.pop(ref)
        self._add_in_flight(attempt.actor, -1)
        try:
            value = ray.get(ref)
        except Exception as e:                # RayTaskError wraps what the method raised
            return self._fail(attempt.request, AttemptFailure(actor=attempt.actor, kind=failure_kind(e),
                                                              message=short(e)))
        actor = self._actors[attempt.actor]
        actor.load = replace(actor.load, recent_failures=0)
        request = attempt.request
        self._outcomes[request.request_id] = RequestOutcome(request_id=request.request_id, label=request.label,
                                                            value=value, attempts=len(request.failures) + 1,
                                                            actor=attempt.actor)
        self._counts["succeeded"] += 1
        return [request.request_id]

    def _expire(self, now: float) -> list[int]:
        """Fail the attempts past their deadline and restart their actors (a hung call is abandoned)."""
        finished: list[int] = []
        expired = [ref for ref, a in self._in_flight.items() if now - a.started > self.config.timeout_s]
        for ref in expired:
            attempt = self._in_flight.pop(ref)
            self._add_in_flight(attempt.actor, -1)
            try:
                ray.cancel(ref)               # so that Ray's own task retry does not re-run it
            except (RayError, ValueError, TypeError):
                pass
            if self._actors[attempt.actor].load.state == "ready":
                self._restart(attempt.actor, now)
            finished += self._fail(attempt.request, AttemptFailure(
                actor=attempt.actor, kind="timeout", message=f"no result within timeout_s={self.config.timeout_s}s"))
        return finished

    def _fail(self, request: PendingRequest, failure: AttemptFailure) -> list[int]:
        self._failures_by_kind[failure.kind] += 1
        actor = self._actors[failure.actor]
        if failure.kind != "task":
            actor.load = replace(actor.load, recent_failures=actor.load.recent_failures + 1)
        if failure.kind == "actor" and actor.load.state == "ready":
            self._set_state(failure.actor, "starting", time.monotonic())      # probe before sending more
        if request.record_failure(failure, max_attempts=self.config.max_attempts):
            self._counts["retries"] += 1
            self._queue.appendleft(request)   # retries go first
            return []
        return self._finish_failed(request)

    def _finish_failed(self, request: PendingRequest) -> list[int]:
        self._counts["failed"] += 1
        self._outcomes[request.request_id] = RequestOutcome(request_id=request.request_id, label=request.label,
                                                            failure=request.as_failed(),
                                                            attempts=len(request.failures))
        return [request.request_id]
