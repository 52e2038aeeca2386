"""Operations of the Ray pipeline: SIGKILL of a rollout actor and of a verifier actor loses no group and
duplicates none (trajectory ids), the rollout actor rejoins with the learner's weights; a checkpoint
resumes to the same steps; the run's numbers are on Ray's Prometheus endpoint while it trains."""
import json
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from driver.config import load
from driver.main import run

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.slow]

SMALL = ["policy.flow.num_steps=4", "policy.flow.window_size=2", "policy.think.max_new_tokens=6", "data.group_size=4",
         "trainer.groups_per_step=2", "eval.enabled=false", "trainer.drop_zero_variance=false", "pools.rollout.num=2",
         "pools.learner.world_size=2", "pools.learner.zero_stage=3", "run.seed=5", "trainer.steps=4",
         "run.checkpoint_every=2", "log.images_every=0", "log.tensorboard=false", "run.save_policy=false",
         "pools.learner.sync_timeout_s=60"]


def _records(out: Path, first: int = 0):
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ids = [i for f in sorted((out / "trajectories").glob("step-*.parquet"))
           for i in pq.read_table(f).column("trajectory_id").to_pylist()]
    return [s for s in steps if s["step"] >= first], ids


def _assert_same(steps, ref_steps):
    assert [s["step"] for s in steps] == [s["step"] for s in ref_steps]
    for x, y in zip(steps, ref_steps):
        for key in ("reward_mean", "reward_std", "loss", "question_pass", "policy_version"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)


def _policy_version(text: str, run_name: str) -> float:
    lines = [line for line in text.splitlines()
             if line.startswith("ray_alphagrpo_policy_version{") and f'run="{run_name}"' in line]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else float("-inf")


def _metrics_text(port: int, run_name: str, *, version: int, wait_s: float = 60.0) -> str:
    """Ray's Prometheus endpoint on this node, once it shows this run at `version` (Ray exports its
    metrics every few seconds, so the first scrape can lag the step that just ended)."""
    deadline = time.time() + wait_s
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if _policy_version(text, run_name) >= version or time.time() > deadline:
            return text
        time.sleep(2)


@pytest.fixture(scope="module")
def reference(ray_cluster, tmp_path_factory):
    """An uninterrupted pipeline run (checkpoints after steps 2 and 4); its metrics read from Prometheus."""
    out = tmp_path_factory.mktemp("runs")
    scraped = []

    def on_step(pipe, rec):
        if rec.step == 3:
            port = ray._private.worker.global_worker.node.metrics_export_port
            scraped.append(_metrics_text(port, "opsref", version=3))

    summary = run(load(SMALL + [f"run.out_dir={out}", "run.name=opsref"]), on_step=on_step)
    assert summary["steps"] == 4
    return out / "opsref", scraped[0]


def test_the_runs_numbers_are_on_rays_prometheus_endpoint(reference):
    _, text = reference
    series = {line.split("{")[0] for line in text.splitlines() if 'run="opsref"' in line}
    for name in ("reward_mean", "reward_std", "question_pass", "stage_seconds", "queue_depth", "staleness_max",
                 "policy_version", "zero_variance_fraction", "cache_hit_rate", "actor_restarts"):
        assert f"ray_alphagrpo_{name}" in series, name
    assert _policy_version(text, "opsref") >= 3                            # published as it trained
    assert any('category="all"' in line for line in text.splitlines() if "ray_alphagrpo_question_pass" in line)


def test_killed_rollout_and_verifier_actors_lose_no_group_and_the_rollout_actor_rejoins(reference, tmp_path):
    ref_out, _ = reference
    kept = {}

    def pid(actor):
        return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))

    def on_step(pipe, rec):
        if rec.step == 0:
            os.kill(pid(pipe.slots[1].actor), signal.SIGKILL)                # mid-run: it may hold a group
        if rec.step == 1:
            os.kill(pid(pipe.reward.verifier_pool.actors[0]), signal.SIGKILL)
        if rec.step == 3:                 # wait for Ray's restart, then the rejoin with the current weights
            deadline = time.time() + 120
            while not all(s.alive for s in pipe.replicas.slots) and time.time() < deadline:
                if pipe.replicas.revive():
                    pipe._regroup()
                time.sleep(1)
            kept["alive"] = [s.alive for s in pipe.replicas.slots]
            kept["restarts"] = [s.restarts for s in pipe.replicas.slots]
            kept["checksums"] = pipe.checksums()

    summary = run(load(SMALL + [f"run.out_dir={tmp_path}", "run.name=ft"]), on_step=on_step)
    assert summary["steps"] == 4
    (steps, ids), (ref_steps, ref_ids) = _records(tmp_path / "ft"), _records(ref_out)
    _assert_same(steps, ref_steps)                                       # the same groups, the same rewards
    assert ids == ref_ids and len(set(ids)) == len(ids)                  # none lost, none twice
    assert kept["alive"] == [True, True] and kept["restarts"] == [0, 1]
    learner, replicas = kept["checksums"]
    assert replicas == [learner, learner]                                # the restarted actor holds the weights


def test_resume_from_a_pipeline_checkpoint_matches_the_uninterrupted_run(reference, tmp_path):
    ref_out, _ = reference
    ckpt = ref_out / "checkpoints" / "step-000002"
    assert (ckpt / "learner" / "state").is_dir() and (ckpt / "trainable.safetensors").is_file()
    shutil.copytree(ckpt, tmp_path / "copy")
    summary = run(load(SMALL + [f"run.out_dir={tmp_path}", "run.name=res", f"run.resume={tmp_path / 'copy'}"]))
    assert summary["steps"] == 4 and summary["steps_this_session"] == 2
    (steps, ids), (ref_steps, ref_ids) = _records(tmp_path / "res"), _records(ref_out, first=2)
    _assert_same(steps, ref_steps)
    assert ids == [i for i in _records(ref_out)[1] if int(i.split(":")[1]) >= 4]   # groups 4.. (2 a step)
