"""Operations in sync mode (no Ray): exact resume, stopping on SIGTERM, surviving SIGKILL of the driver,
what a run records (TensorBoard read back with tensorboard's reader, Parquet with pyarrow), bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from driver.checkpoint import CheckpointError
from driver.config import REPO_ROOT, load
from driver.main import run

SMALL = ["trainer.mode=sync", "policy.flow.num_steps=4", "policy.flow.window_size=2", "policy.think.max_new_tokens=6",
         "data.group_size=4", "trainer.groups_per_step=2", "eval.enabled=false", "run.checkpoint_every=1",
         "log.images_every=2", "run.save_policy=false"]


def _records(out: Path):
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ids = [i for f in sorted((out / "trajectories").glob("step-*.parquet"))
           for i in pq.read_table(f).column("trajectory_id").to_pylist()]
    return steps, ids


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 4-step run."""
    out = tmp_path_factory.mktemp("runs")
    summary = run(load(SMALL + ["trainer.steps=4", f"run.out_dir={out}", "run.name=ref"]))
    assert summary["steps"] == 4 and not summary["stopped"]
    return out / "ref"


def _same_steps(a, b):
    assert [s["step"] for s in a] == [s["step"] for s in b]
    for x, y in zip(a, b):
        for key in ("reward_mean", "reward_std", "loss", "grad_norm", "question_pass", "policy_version"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)


def test_resume_continues_with_the_same_prompts_losses_and_rewards(reference, tmp_path):
    cfg = SMALL + [f"run.out_dir={tmp_path}", "run.name=r"]
    assert run(load(cfg + ["trainer.steps=2"]))["steps"] == 2
    summary = run(load(cfg + ["trainer.steps=4", "run.resume=auto"]))
    assert summary["steps"] == 4 and summary["steps_this_session"] == 2
    (ref_steps, ref_ids), (steps, ids) = _records(reference), _records(tmp_path / "r")
    _same_steps(steps, ref_steps)
    assert ids == ref_ids and len(set(ids)) == len(ids)                # none lost, none twice
    # what it recorded, read back: TensorBoard with tensorboard's own reader, Parquet with pyarrow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "r" / "tensorboard")).Reload()
    tags = acc.Tags()["scalars"]
    assert {"reward/mean", "policy/grad_norm", "policy/image_ratio_max", "policy/think_entropy",
            "pass/all", "timing/learn"} <= set(tags)
    assert [e.step for e in acc.Scalars("reward/mean")] == [0, 1, 2, 3]   # the resumed half appended, no repeats
    assert [e.value for e in acc.Scalars("reward/mean")] == pytest.approx([s["reward_mean"] for s in ref_steps])
    assert acc.Tags()["images"] == ["samples/grid"] and [e.step for e in acc.Images("samples/grid")] == [0, 2]
    table = pq.read_table(tmp_path / "r" / "trajectories" / "step-000002.parquet").to_pylist()
    row = table[0]
    assert len(table) == 2 * 4 and row["step"] == 2 and row["task"] == "rt2i" and row["policy_version"] == 2
    assert row["questions"] and {"text", "category", "score", "effective"} <= set(row["questions"][0])
    assert sum(r["reward"] for r in table) / len(table) == pytest.approx(steps[2]["reward_mean"])
    assert Path(row["image_path"]).is_file() and row["text"] is not None


def test_sigterm_stops_with_a_checkpoint_and_sigkill_loses_nothing(reference, tmp_path):
    """The driver as a user runs it: SIGTERM after step 0 (it finishes the step, checkpoints, exits 0),
    resume; SIGKILL after step 2 (the last checkpoint stays), resume to the end: the same records as
    the uninterrupted run, every trajectory exactly once."""
    cmd = [sys.executable, "-m", "driver.main", *SMALL, "trainer.steps=4", f"run.out_dir={tmp_path}", "run.name=k"]

    def launch(extra, until, sig):
        proc = subprocess.Popen(cmd + extra, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"step {until:4d}"):
                os.killpg(proc.pid, sig)
                break
        rest = proc.communicate(timeout=600)[0]
        return proc.returncode, "".join(seen) + rest

    code, out = launch([], 0, signal.SIGTERM)
    assert code == 0 and "SIGTERM: finishing the step in flight" in out and "continue with run.resume=auto" in out
    summary = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert summary["stopped"] and summary["steps"] == 1 and summary["checkpoint"].endswith("step-000001")
    code, out = launch(["run.resume=auto"], 2, signal.SIGKILL)
    assert code == -signal.SIGKILL and "resuming from" in out
    code, out = launch(["run.resume=auto"], 99, signal.SIGKILL)            # to the end
    assert code == 0 and "resuming from" in out and "done:" in out
    (ref_steps, ref_ids), (steps, ids) = _records(reference), _records(tmp_path / "k")
    _same_steps(steps, ref_steps)
    assert ids == ref_ids and len(set(ids)) == len(ids)


def test_a_corrupted_checkpoint_is_refused_naming_the_file(tmp_path):
    cfg = SMALL + [f"run.out_dir={tmp_path}", "run.name=c", "trainer.steps=1", "log.tensorboard=false"]
    run(load(cfg))
    target = tmp_path / "c" / "checkpoints" / "step-000001" / "trainable.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{target}: contents differ"):
        run(load(cfg + ["trainer.steps=2", "run.resume=auto"]))


def test_a_non_finite_reward_is_refused_naming_the_sample_and_its_prompt():
    from driver.lanes import Ready
    from driver.stages import check_finite
    from driver.sync import done
    from reward_service.scoring import ScoreResult
    from worlds.records import PromptRecord
    g = Ready(task="rt2i", index=7, prompt=PromptRecord(id="p7", text="a red circle"), policy_version=0, meta=None,
              payload=None, scores=done([ScoreResult(key="k", reward=r, audit=None, verifier="v")
                                         for r in (0.5, float("nan"))]))
    with pytest.raises(ValueError, match=r"rt2i group 7 sample 1 \(prompt p7 'a red circle'\): reward nan"):
        check_finite([g])


def test_a_verifier_that_answers_garbage_is_named():
    import numpy as np

    from reward_service.backends import BackendSpec
    from reward_service.scoring import ScoreRequest, VerifierWorker
    from tests.reward_service.llm_helpers import question_set

    worker = VerifierWorker(BackendSpec(name="shapes"))

    class Garbage:
        name = "shapes"

        def answer_batch(self, items):
            return [[float("nan")] * len(qs.questions) for _, qs in items]

    worker.verifier = Garbage()
    req = ScoreRequest(key="group3/sample1", image=np.zeros((8, 8, 3), np.uint8), question_set=question_set(["q?"]))
    with pytest.raises(ValueError, match=r"verifier backend 'shapes' answered garbage for sample 'group3/sample1'"):
        worker.score([req])
