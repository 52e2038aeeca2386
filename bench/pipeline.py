"""P1 of issue 6: trajectories/s of the streaming Ray pipeline / `trainer.mode=sync`, same config.

    python -m bench.pipeline [--steps 4] [overrides ...]

Both runs train the shipped shapes policy from the same seed for the same number of steps (eval off);
the pipeline runs on a local Ray cluster (2 rollout actors, 2 ZeRO-3 learner ranks, shapes reward
pools, max_staleness from the overrides, default 1 so rollouts overlap the learner). Setup (Ray start,
actor and DeepSpeed init) is excluded: throughput = trajectories / seconds of the training loop.
The last stdout line is a one-line summary with the ratio (goal >= 1.3x).
"""
from __future__ import annotations

import argparse
import json
import time

from driver.config import load
from driver.sync import train_sync

BASE = ["eval.enabled=false", "trainer.drop_zero_variance=false", "run.name=bench-pipeline"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. trainer.groups_per_step=4")
    args = ap.parse_args(argv)
    common = BASE + [f"trainer.steps={args.steps}"] + args.overrides
    if not any(o.startswith("trainer.max_staleness=") for o in args.overrides):
        common.append("trainer.max_staleness=1")

    sync = train_sync(load(common + ["trainer.mode=sync"]))
    sync_tps = sync.trajectories / sync.seconds
    print(f"sync: {sync.trajectories} trajectories in {sync.seconds:.1f} s = {sync_tps:.2f}/s", flush=True)

    from driver.cluster import connect, required_resources
    from driver.pipeline import Pipeline
    cfg = load(common + ["trainer.mode=pipeline"])
    connect(cfg.ray, need_cpus=required_resources(cfg)["CPU"])
    pipe = Pipeline(cfg)
    try:
        t0 = time.perf_counter()
        piped = pipe.run()
        seconds = time.perf_counter() - t0
    finally:
        pipe.shutdown()
    pipe_tps = piped.trajectories / seconds
    print(f"pipeline: {piped.trajectories} trajectories in {seconds:.1f} s = {pipe_tps:.2f}/s "
          f"(staleness seen {sorted(set(pipe.counters.staleness_seen))})", flush=True)
    print(json.dumps({"bench": "P1 pipeline/sync trajectories per second", "sync_tps": round(sync_tps, 3),
                      "pipeline_tps": round(pipe_tps, 3), "ratio": round(pipe_tps / sync_tps, 3), "goal": 1.3}))


if __name__ == "__main__":
    main()
