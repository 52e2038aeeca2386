"""The real path end to end on CPU: configs/bagel-7b.yaml with overrides only for sizes and resources.

A random tiny BAGEL in the exact public layout with its own byte-level BPE tokenizer
(`python -m umm.make_tiny`), GenEval-format .jsonl prompt files, DVReward from vllm-cpu (a tiny
random Qwen2 decomposer, a tiny random Idefics3 verifier) in the reward pools, 2 ZeRO-3 learner
ranks training LoRA; 2 steps, each with two reasoning text-to-image groups (rollout pool) and two
self-reflective refinement episodes (refine pool). After each step every replica's checksum (rollout
and refine actors) equals the learner's; the held-out DVReward evaluation (no judge: prompt files have
none) is printed before and after."""
import json
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from driver.config import REPO_ROOT, load  # noqa: E402
from tests.reward_service.llm_helpers import VLLM_CPU_OPTIONS, VLLM_ENV, vllm_cleanup  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.deepspeed, pytest.mark.vllm, pytest.mark.slow]

TRAIN = [("a photo of a red bench", "colors"), ("a photo of two dogs", "counting"),
         ("a photo of a cat left of a car", "position"), ("a photo of a blue cup and a yellow kite", "color_attr")]
HELDOUT = [("a photo of a green apple", "colors"), ("a photo of three birds", "counting")]


def _geneval_lines(path: Path, rows) -> Path:
    """Lines in GenEval's evaluation_metadata.jsonl form (tag, include, prompt)."""
    path.write_text("".join(json.dumps({"tag": tag, "include": [{"class": "object", "count": 1}], "prompt": text}) + "\n"
                            for text, tag in rows))
    return path


def test_bagel_layout_checkpoint_trains_on_prompt_files_with_vllm_rewards(ray_cluster, tmp_path, capsys):
    from bench.tiny_models import build_idefics3, build_qwen2
    from driver.main import run
    from umm.make_tiny import make_tiny

    ckpt = make_tiny(tmp_path / "tiny-bagel")
    qwen, vlm = build_qwen2(tmp_path / "qwen2"), build_idefics3(tmp_path / "idefics3")
    engine = json.dumps(VLLM_CPU_OPTIONS).replace('"', "")
    env = "{" + ", ".join(f"{k}: '{v}'" for k, v in VLLM_ENV.items()) + "}"
    overrides = [
        f"config={REPO_ROOT / 'configs' / 'bagel-7b.yaml'}",
        # where things are
        f"policy.checkpoint={ckpt}", f"data.train.source={_geneval_lines(tmp_path / 'train.jsonl', TRAIN)}",
        f"data.heldout.source={_geneval_lines(tmp_path / 'heldout.jsonl', HELDOUT)}",
        f"reward.decomposer.options={{model: {qwen}, tensor_parallel_size: 1, max_tokens: 512, budget: 2, "
        f"{engine[1:-1]}}}",
        f"reward.verifier.options={{model: {vlm}, tensor_parallel_size: 1, top_logprobs: 600, answer_tokens: 2, "
        f"{engine[1:-1]}}}",
        f"reward.cache={tmp_path / 'decompositions.sqlite'}", f"run.out_dir={tmp_path / 'runs'}",
        # sizes
        "policy.canvas_size=32", "policy.lora.rank=4", "policy.lora.alpha=8", "policy.think.max_new_tokens=8",
        "policy.flow.num_steps=4", "policy.flow.window_size=2", "data.group_size=2", "trainer.steps=2",
        "trainer.groups_per_step=4", "eval.num_steps=4", "eval.images_per_prompt=1",
        # both tasks: SRR at sizes a CPU affords (the method's sampler otherwise)
        "tasks.rt2i=0.5", "tasks.srr=0.5", "srr.candidates=2", "srr.candidate_steps=3",
        "srr.think.max_new_tokens=8", "srr.flow.num_steps=4", "srr.flow.window_size=2", "srr.flow.window_start=[0,1]",
        # resources (2 CPU cores; vllm-cpu runs its engine inside the actor)
        "pools.rollout.num=2", "pools.rollout.num_cpus=0.5", "pools.rollout.num_gpus=0",
        "pools.refine.num=1", "pools.refine.num_cpus=0.5", "pools.refine.num_gpus=0",
        "pools.decomposer.num_cpus=0.25", "pools.decomposer.num_gpus=0", f"pools.decomposer.env={env}",
        "pools.verifier.num=1", "pools.verifier.num_cpus=0.25", "pools.verifier.num_gpus=0",
        f"pools.verifier.env={env}",
        "pools.learner.world_size=2", "pools.learner.num_cpus=0.5", "pools.learner.num_gpus=0"]
    cfg = load(overrides)
    assert cfg.policy.lora.enabled and cfg.pools.learner.zero_stage == 3 and cfg.reward.verifier.name == "vllm"
    synced, tasks = [], []

    def check(pipe, rec):
        learner, replicas = pipe.checksums()
        synced.append((rec.policy_version, learner, replicas))
        tasks.append({task: m["groups"] for task, m in rec.tasks.items()})

    with vllm_cleanup():
        summary = run(cfg, on_step=check)
    out = capsys.readouterr().out
    assert summary["steps"] == 2 and [v for v, _, _ in synced] == [1, 2]
    assert tasks == [{"rt2i": 2, "srr": 2}] * 2                         # each rank: one group of each task
    for version, learner, replicas in synced:
        assert replicas == [learner] * 3, f"after v{version}: learner {learner:#x}, replicas {replicas}"
    assert synced[0][1] != synced[1][1]                                 # LoRA moved
    before, after = summary["before"], summary["after"]
    assert set(before) == set(after) and "reward/mean" in before and "pass/all" in before
    assert {"reward/colors", "reward/counting"} <= set(before) and not any(k.startswith("judge/") for k in before)
    assert all(0.0 <= v <= 1.0 for v in before.values())
    assert "held-out metric" in out and "reward/mean" in out and "step    1 v2" in out
    assert (Path(summary["policy"]) / "tokenizer.json").exists()
