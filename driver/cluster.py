"""Joining or starting the Ray cluster a run uses."""
from __future__ import annotations

import math
import os

from driver.config import Config, ConfigError, LearnerSection, RayConfig


def required_resources(cfg: Config) -> dict[str, float]:
    """Logical CPUs/GPUs the configured pools ask Ray for."""
    p = cfg.pools
    pools = [(p.rollout.num, p.rollout.num_cpus, p.rollout.num_gpus),
             (p.refine.num, p.refine.num_cpus, p.refine.num_gpus),
             (p.decomposer.num, p.decomposer.num_cpus, p.decomposer.num_gpus),
             (p.verifier.num, p.verifier.num_cpus, p.verifier.num_gpus),
             (p.learner.world_size, p.learner.num_cpus, p.learner.num_gpus)]
    return {"CPU": sum(n * c for n, c, _ in pools), "GPU": sum(n * g for n, _, g in pools)}


def check_resources(cfg: Config, available: dict[str, float]) -> None:
    """Fail before any actor starts (a learner rank that cannot be placed would hang the others)."""
    need = required_resources(cfg)
    for kind, amount in need.items():
        if amount > available.get(kind, 0.0) + 1e-9:
            raise ConfigError(f"the pools need {amount:g} {kind} but the cluster has {available.get(kind, 0.0):g}: "
                              f"lower pools.*.num / num_cpus / num_gpus / pools.learner.world_size, or add nodes")


def connect(cfg: RayConfig, *, runtime_env: dict | None = None, need_cpus: float = 0.0) -> str:
    """Join `ray.address` or RAY_ADDRESS (set by `ray job submit`) when given; otherwise start a local
    cluster bound to 127.0.0.1 with the dashboard on (127.0.0.1 only). Token auth is Ray's default
    and stays on. A local cluster advertises at least `need_cpus` logical CPUs (Ray's CPUs are
    scheduling units; the pools mostly wait on each other). Returns a line for the run's log."""
    # on Linux Ray would listen on the routable address even when given 127.0.0.1; this keeps a
    # single-node cluster on loopback (read when Ray is imported)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    if ray.is_initialized():
        return "ray: already initialised in this process"
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)   # a job's own runtime_env applies (ray job submit)
        return f"ray: joined {address}"
    num_cpus = cfg.num_cpus or max(os.cpu_count() or 1, math.ceil(need_cpus))
    ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=cfg.dashboard,
                   dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", runtime_env=runtime_env)
    url = getattr(ctx, "dashboard_url", None)
    return (f"ray: started a local cluster on 127.0.0.1 ({num_cpus} logical CPUs)"
            + (f", dashboard http://{url}" if url else ""))


def learner_placement(ray, learner: LearnerSection) -> tuple[object, list[dict]]:
    """Reserve every learner rank's resources at once (a placement group, one bundle per rank), so a
    group that cannot be fully placed fails here, naming the config, instead of W - 1 ranks waiting
    forever in DeepSpeed's rendezvous. Returns the group and each rank's actor `.options(...)`."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {k: v for k, v in (("CPU", learner.num_cpus), ("GPU", learner.num_gpus)) if v > 0}
    pg = placement_group([dict(bundle) for _ in range(learner.world_size)], strategy=learner.placement)
    ready, _ = ray.wait([pg.ready()], timeout=learner.placement_timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise ConfigError(f"pools.learner: {learner.world_size} ranks of {bundle} with placement "
                          f"{learner.placement!r} could not be placed within {learner.placement_timeout_s:g} s "
                          f"(pools.learner.placement_timeout_s); the cluster has {ray.cluster_resources()}")
    options = [dict(num_cpus=learner.num_cpus, num_gpus=learner.num_gpus,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))
               for i in range(learner.world_size)]
    return pg, options
