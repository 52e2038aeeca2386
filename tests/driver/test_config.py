"""The run configuration: defaults load, overrides apply, bad values name their key."""
import pytest

from driver.config import ConfigError, load, to_yaml


def test_default_config_is_the_shapes_world():
    cfg = load([])
    assert cfg.trainer.mode == "pipeline"
    assert cfg.policy.checkpoint.endswith("checkpoints/shapes-base")
    assert cfg.reward.decomposer.name == cfg.reward.verifier.name == "shapes"
    assert cfg.pools.learner.world_size >= 2


def test_dotlist_overrides_and_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  steps: 7\ndata:\n  group_size: 4\n")
    cfg = load([f"config={path}", "trainer.steps=9", "trainer.mode=sync"])
    assert (cfg.trainer.steps, cfg.data.group_size, cfg.trainer.mode) == (9, 4, "sync")
    assert "steps: 9" in to_yaml(cfg)


@pytest.mark.parametrize("override, names", [
    ("trainer.mode=async", ["trainer.mode", "pipeline", "sync"]),
    ("trainer.stepz=3", ["trainer.stepz"]),
    ("trainer.steps=many", ["trainer.steps"]),
    ("data.families=[single_object]", ["data.families", "not in 'DataConfig'"]),
    ("data.on_bad_row=drop", ["data.on_bad_row", "skip"]),
    ('data.train.source=""', ["data.train.source", "empty"]),
    ('data.heldout.source=""', ["eval.enabled", "data.heldout.source"]),
    ("policy.base=tiny", ["policy.base", "not in 'PolicyConfig'"]),
    ("policy.think.top_p=0", ["policy.think.top_p", "(0, 1]"]),
    ("policy.flow.cfg.renorm_type=l2", ["policy.flow.cfg.renorm_type"]),
    ("policy.edit_cfg.image_scale=0.5", ["policy.edit_cfg.image_scale"]),
    ("trainer.loss.text_level=word", ["trainer.loss.text_level", "sequence"]),
    ("data.group_size=1", ["data.group_size", ">= 2"]),
    ("reward.mode=max", ["reward.mode", "geometric"]),
    ("policy.flow.window_size=20", ["policy.flow.window_size", "num_steps"]),
    # 10 steps (default.yaml), window 4 from step 6: reaches step 9, the last one (issue 15)
    ("policy.flow.window_start=[0,6]", ["policy.flow.window_start", "[0, 6]", "last step 9"]),
    ("policy.flow.window_start=[0,1,2]", ["policy.flow.window_start=[0,1,2]", "length 3"]),
    ("policy.flow.noise_level=-1", ["policy.flow.noise_level", ">= 0"]),
    ("policy.flow.sigma_at_one=clamp", ["policy.flow.sigma_at_one", "flow_grpo", "capped"]),
    ("trainer.loss.image_kl_scale=nats", ["trainer.loss.image_kl_scale", "flow_grpo", "exact"]),
    ("policy.checkpoint=/nonexistent", ["policy.checkpoint", "/nonexistent"]),
    ("trainer.groups_per_step=3", ["trainer.groups_per_step", "world_size"]),
    ("eval.images_per_prompt=0", ["eval.images_per_prompt", ">= 1"]),
    ("pools.learner.placement=PACKED", ["pools.learner.placement", "STRICT_SPREAD"]),
    ("pools.learner.num_cpus=0", ["pools.learner.num_cpus", "bundle"]),
    ("pools.learner.max_reuse_distance=-2", ["pools.learner.max_reuse_distance", ">= -1"]),
    ("pools.learner.weight_lane=nccl", ["pools.learner.weight_lane", "gloo"]),
    ("steps", ["key=value"]),
])
def test_bad_values_name_the_key(override, names):
    with pytest.raises(ConfigError) as e:
        load([override])
    for n in names:
        assert n in str(e.value)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load([f"config={tmp_path / 'nope.yaml'}"])


def test_the_last_window_that_fits_is_accepted():
    cfg = load(["policy.flow.window_start=[0,5]"])        # 10 steps, window 4: ends at step 8
    assert list(cfg.policy.flow.window_start) == [0, 5] and cfg.policy.flow.sigma_at_one == "flow_grpo"


def test_sync_mode_does_not_need_divisible_learner_shards():
    cfg = load(["trainer.mode=sync", "trainer.groups_per_step=3"])
    assert cfg.trainer.groups_per_step == 3


@pytest.mark.parametrize("module", ["driver.main", "driver.refine"])
def test_a_command_with_a_bad_config_says_which_key_and_exits_2_without_a_traceback(module):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", module, "trainer.steps=-1"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("config error: trainer.steps"), done.stderr
    assert "Traceback" not in done.stderr
