"""Soak: a long pipeline run on this machine, watching what must not grow (issue 18).

    python -m bench.soak [--steps 300] [overrides ...]

Trains the shapes default with tiny sampler settings through the Ray pipeline (2 rollout actors, 2
ZeRO-3 learner ranks, checkpoints every 50 steps, TensorBoard and Parquet on) and samples, after every
step, the driver's resident memory (RSS) and the object store's used bytes. Growth = the mean over the
last fifth of the run / the mean over steps 20-40 (after warm-up) - 1; goal <= 10 % for both. The last
stdout line is a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile

from driver.config import load

BASE = ["policy.flow.num_steps=3", "policy.flow.window_size=1", "policy.flow.window_start=[0,1]",
        "policy.think.max_new_tokens=4", "data.group_size=2", "trainer.groups_per_step=2", "eval.enabled=false",
        "pools.rollout.num=2", "pools.learner.world_size=2", "pools.learner.zero_stage=3", "run.checkpoint_every=50",
        "log.images_every=50", "run.save_policy=false", "run.name=soak"]


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def store_used_bytes(ray) -> float:
    """Bytes held in the object store (plasma) across the cluster, as `ray memory --stats-only` reports
    them (Ray's internal API: the public resource view counts reservations, not stored objects)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    return float(reply.store_stats.object_store_bytes_used)


def growth(series: list[float]) -> float:
    base = statistics.fmean(series[20:40])
    tail = statistics.fmean(series[-max(1, len(series) // 5):])
    return tail / base - 1.0 if base else 0.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    import ray

    from driver.main import run
    rss, store = [], []

    def on_step(pipe, rec):
        rss.append(rss_bytes())
        store.append(store_used_bytes(ray))
        if rec.step % 25 == 0:
            print(f"soak step {rec.step}: driver RSS {rss[-1] / 2**20:.0f} MiB, object store {store[-1] / 2**20:.1f} MiB",
                  flush=True)

    with tempfile.TemporaryDirectory() as out:
        run(load(BASE + [f"trainer.steps={args.steps}", f"run.out_dir={out}", *args.overrides]), on_step=on_step)
    summary = {"bench": "soak: growth over the run (goal <= 0.10)", "steps": len(rss),
               "rss_mib_start": round(statistics.fmean(rss[20:40]) / 2**20, 1),
               "rss_mib_end": round(statistics.fmean(rss[-max(1, len(rss) // 5):]) / 2**20, 1),
               "rss_growth": round(growth(rss), 4),
               "store_mib_start": round(statistics.fmean(store[20:40]) / 2**20, 2),
               "store_mib_end": round(statistics.fmean(store[-max(1, len(store) // 5):]) / 2**20, 2),
               "store_growth": round(growth(store), 4), "goal": 0.10}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
