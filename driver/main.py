"""Train a unified model with GRPO: `python -m driver.main [config=PATH] [key=value ...]`.

    python -m driver.main                                   # the shapes world on this machine
    python -m driver.main trainer.steps=50 data.group_size=4
    python -m driver.main trainer.mode=sync                 # the single-process baseline
    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m driver.main trainer.steps=2              # on a running cluster

Prints one line per optimizer step and, with eval.enabled, the held-out metrics (mean DVReward,
question pass rates per category, and the world's judge where it has one) before and after training.
Writes runs/<run.name>/{config.yaml, metrics.jsonl, summary.json, policy/}.
"""
from __future__ import annotations

import json
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from driver.checkpoint import Checkpointer, complete, resolve
from driver.config import REPO_ROOT, Config, load_command_line, to_yaml
from driver.metrics import before_after_table
from driver.runlog import RunLog


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT / SIGTERM: the trainers finish the step in flight, checkpoint and return. A
    second signal stops at once (the last checkpoint stays)."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name}: finishing the step in flight, then a checkpoint "
              "(send again to stop at once)", flush=True)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    return stop


def run(cfg: Config, *, on_step=None, stop: threading.Event | None = None) -> dict:
    """Train as configured; `on_step(pipeline, record)` (pipeline mode) runs after each step's weight sync;
    `stop` ends the run early with a checkpoint (main() sets it on SIGINT / SIGTERM)."""
    out = Path(cfg.run.out_dir) / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    ckpt_root = out / "checkpoints"
    resume = resolve(cfg.run.resume, ckpt_root)
    if resume is None and complete(ckpt_root):
        print(f"run.resume={cfg.run.resume}: starting over; the run's old checkpoints ({ckpt_root}) are removed",
              flush=True)
        shutil.rmtree(ckpt_root)
    (out / "config.yaml").write_text(to_yaml(cfg))
    resumed_step = None if resume is None else json.loads((resume / "driver.json").read_text())["step"]
    log = RunLog(out, cfg.log, resume_steps=resumed_step)
    checkpoints = Checkpointer(ckpt_root, every=cfg.run.checkpoint_every, keep=cfg.run.keep_checkpoints,
                               merged=cfg.run.checkpoint_merged)
    print(f"run {cfg.run.name}: mode={cfg.trainer.mode} steps={cfg.trainer.steps} "
          f"B={cfg.trainer.groups_per_step} G={cfg.data.group_size} policy={cfg.policy.checkpoint} -> {out}",
          flush=True)
    if resume is not None:
        print(f"resuming from {resume} (step {resumed_step} done)", flush=True)
    elif cfg.eval.enabled:
        per = cfg.eval.prompts_per_category or "all"
        when = "before and after training" if cfg.eval.before else "after training"
        print(f"held-out evaluation ({cfg.data.heldout.source}) {when}: {per} prompts per category x "
              f"{cfg.eval.images_per_prompt} image(s)" + ("; evaluating the starting policy..." if cfg.eval.before
                                                          else ""), flush=True)
    policy_dir = out / "policy" if cfg.run.save_policy else None
    t0 = time.perf_counter()
    try:
        if cfg.trainer.mode == "sync":
            from driver.sync import train_sync
            result = train_sync(cfg, log=log, save_to=policy_dir, checkpoints=checkpoints, resume=resume, stop=stop)
        else:
            result = _run_pipeline(cfg, log=log, on_step=on_step, checkpoints=checkpoints, resume=resume, stop=stop,
                                   policy_dir=policy_dir)
    finally:
        log.close()
    summary = {"mode": cfg.trainer.mode, "steps": result.start_step + len(result.steps),
               "steps_this_session": len(result.steps), "trajectories": result.trajectories,
               "seconds": round(time.perf_counter() - t0, 1), "first_loss": result.first_loss,
               "before": result.before, "after": result.after, "stopped": result.stopped,
               "checkpoint": str(result.checkpoint) if result.checkpoint else None}
    if result.before is not None and result.after is not None:
        print(f"held-out ({cfg.data.heldout.source}): DVReward, question pass rates, judge (if any)")
        print(before_after_table(result.before, result.after), flush=True)
    if policy_dir is not None and not result.stopped:
        summary["policy"] = str(policy_dir)
        print(f"trained policy: {policy_dir} (train on or evaluate: policy.checkpoint={policy_dir})", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if result.stopped:
        print(f"stopped after step {summary['steps']}: checkpoint {result.checkpoint}; continue with "
              f"run.resume=auto", flush=True)
    print(f"done: {len(result.steps)} steps, {result.trajectories} trajectories in {summary['seconds']} s", flush=True)
    return summary


def _run_pipeline(cfg: Config, *, log, on_step, checkpoints, resume, stop, policy_dir):
    from driver.cluster import connect, required_resources
    from driver.pipeline import Pipeline
    print(connect(cfg.ray, runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}},
                  need_cpus=required_resources(cfg)["CPU"]), flush=True)
    pipe = Pipeline(cfg)
    print(f"weight sync: {pipe.weight_lane} lane ("
          + ("shared memory: every replica is on learner rank 0's node)" if pipe.weight_lane == "shared"
             else "gloo broadcast)"), flush=True)
    try:
        result = pipe.run(log=log, on_step=on_step, checkpoints=checkpoints, resume=resume, stop=stop)
        learner_sum, actor_sums = pipe.checksums()
        live = pipe.replicas.live
        same = all(c == learner_sum for c in actor_sums)
        print(f"weights: learner checksum {learner_sum:#018x}; {sum(s.kind == 'rollout' for s in live)} rollout "
              f"and {sum(s.kind == 'refine' for s in live)} refine replicas "
              + ("all equal to it" if same else "DIFFER: " + ", ".join(f"{c:#018x}" for c in actor_sums)),
              flush=True)
        if policy_dir is not None and not result.stopped:
            pipe.save_policy(policy_dir)
        return result
    finally:
        pipe.shutdown()


def main(argv: list[str] | None = None) -> int:
    cfg = load_command_line(argv)
    run(cfg, stop=stop_on_signals())
    return 0


if __name__ == "__main__":
    sys.exit(main())
