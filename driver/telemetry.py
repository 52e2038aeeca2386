"""The run's live numbers as Ray metrics (`ray.util.metrics`): Ray exports them on each node's Prometheus
endpoint (`http://<node>:<metrics_export_port>/metrics`, names prefixed `ray_alphagrpo_`) and the
dashboard's Metrics view shows them next to Ray's own. Every series carries the run's name.

    reward_mean / reward_std / judge_acc        the step's training batch
    question_pass{category}                     DVReward question pass rate per category
    stage_seconds{stage}                        rollout, learn, sync, learn+sync (this step)
    queue_depth{lane, state}                    groups in flight / scored and waiting, per task lane
    staleness_max / staleness_mean              learner version - sampling version of the batch's groups
    policy_version                              the learner's version after the step
    zero_variance_fraction                      groups dropped as zero-variance / groups scored, this step
    cache_hit_rate                              the decomposition cache's hit rate (the run so far)
    actor_restarts{pool}                        restarts of policy replicas (rollout, refine) and of the
                                                reward pools' actors (decomposer, verifier), so far
"""
from __future__ import annotations


class RayMetrics:
    """Gauges for the names above (Ray must be initialised in this process)."""

    def __init__(self, run: str) -> None:
        from ray.util.metrics import Gauge

        self.run = run
        spec = {"reward_mean": (), "reward_std": (), "judge_acc": (), "question_pass": ("category",),
                "stage_seconds": ("stage",), "queue_depth": ("lane", "state"), "staleness_max": (),
                "staleness_mean": (), "policy_version": (), "zero_variance_fraction": (), "cache_hit_rate": (),
                "actor_restarts": ("pool",)}
        self.gauges = {name: Gauge(f"alphagrpo_{name}", description=f"alphagrpo {name.replace('_', ' ')}",
                                   tag_keys=("run", *tags)) for name, tags in spec.items()}

    def _set(self, name: str, value, **tags) -> None:
        if value is not None and value == value:      # not NaN
            self.gauges[name].set(float(value), tags={"run": self.run, **tags})

    def step(self, rec, *, lanes, restarts: dict[str, int], cache_hit_rate: float | None) -> None:
        """Record one step (`rec`: a StepRecord) with the lanes' queue depths and the restart counts."""
        self._set("reward_mean", rec.reward_mean)
        self._set("reward_std", rec.reward_std)
        self._set("judge_acc", rec.judge_acc)
        for category, rate in rec.question_pass.items():
            self._set("question_pass", rate, category=category)
        for stage, seconds in rec.seconds.items():
            self._set("stage_seconds", seconds, stage=stage)
        for lane in lanes:
            self._set("queue_depth", len(lane.inflight), lane=lane.task, state="in_flight")
            self._set("queue_depth", len(lane.done), lane=lane.task, state="scored")
        self._set("staleness_max", rec.staleness_max)
        self._set("staleness_mean", rec.staleness_mean)
        self._set("policy_version", rec.policy_version)
        scored = rec.groups + rec.zero_variance_dropped + rec.stale_dropped
        self._set("zero_variance_fraction", rec.zero_variance_dropped / scored if scored else 0.0)
        self._set("cache_hit_rate", cache_hit_rate)
        for pool, n in restarts.items():
            self._set("actor_restarts", n, pool=pool)
