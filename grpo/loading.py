"""The policy's checkpoint side: what to load (PolicyConfig), loading it trainable, saving it back.

    PolicyConfig    checkpoint folder, LoRA, canvas, and the sampler settings (think, flow, edit CFG)
    load_policy     the folder's model (any BAGEL-layout folder: umm.checkpoint.read_config), with the
                    LoRA adapters when `lora.enabled`
    load_prompter   the folder's tokenizer and prompt format (umm.prompting), checked against the model
    save_policy     the trained policy as a checkpoint folder: LoRA folded in, tokenizer files and
                    prompt_format.json copied beside it (so `policy.checkpoint=<it>` loads it)
    PolicyFactory   a picklable recipe a learner rank builds from, whole or partitioned (ZeRO-3)

No Ray, no DeepSpeed here: the actors and the one-process baseline both call these.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from grpo.policy import FlowConfig, ThinkConfig
from umm.config import ConfigError
from umm.guidance import CFGConfig
from umm.lora import LoRAConfig
from umm.model import UnifiedModel
from umm.prompting import Prompter
from umm.tokenizer import FORMAT_FILE, HF_FILES

TOKENIZER_FILES: tuple[str, ...] = (*HF_FILES, "generation_config.json", FORMAT_FILE)


@dataclass(kw_only=True)
class LoRASection(LoRAConfig):
    """LoRA on both experts (umm.lora.LoRAConfig's fields and defaults) and whether to train it."""
    enabled: bool = False            # off: every weight but the fixed position tables trains (tiny models)


def _edit_cfg() -> CFGConfig:
    return CFGConfig(text_scale=4.0, image_scale=1.5, renorm_type="text_channel")


@dataclass(kw_only=True)
class PolicyConfig:
    """The policy: where it is and how it samples."""
    checkpoint: str = "checkpoints/shapes-base"   # a BAGEL-layout folder (weights, configs, tokenizer files)
    canvas_size: int = 32                         # pixels per image side
    lora: LoRASection = field(default_factory=LoRASection)
    think: ThinkConfig = field(default_factory=ThinkConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    edit_cfg: CFGConfig = field(default_factory=_edit_cfg)   # guidance of edits (refinements): text + source image

    def validate(self, prefix: str = "policy") -> "PolicyConfig":
        if self.canvas_size < 1:
            raise ConfigError(f"{prefix}.canvas_size: must be >= 1, got {self.canvas_size}")
        if self.lora.enabled:
            self.lora.validate(f"{prefix}.lora")
        self.think.validate(f"{prefix}.think")
        self.flow.validate(f"{prefix}.flow")
        self.edit_cfg.validate(f"{prefix}.edit_cfg")
        return self


def load_policy(policy: PolicyConfig) -> UnifiedModel:
    """The checkpoint, trainable: LoRA adapters only, or all weights but the fixed position tables.
    Returned in train mode (no dropout in this model; mode only matters for peft)."""
    from umm.checkpoint import load_pretrained

    saved = load_pretrained(policy.checkpoint)
    model = UnifiedModel(saved.cfg)                  # fresh module: its own requires_grad pattern
    model.load_state_dict(saved.state_dict())
    return with_lora(model, policy)


def with_lora(model: UnifiedModel, policy: PolicyConfig) -> UnifiedModel:
    """The LoRA adapters when `policy.lora.enabled` (everything else frozen); the model unchanged otherwise."""
    from umm.lora import apply_lora

    if policy.lora.enabled:
        apply_lora(model, policy.lora)
    return model


def load_prompter(checkpoint: str | Path, model_cfg) -> Prompter:
    """The checkpoint's tokenizer and prompt format, refused (naming both files) when its special ids
    disagree with the model config."""
    from umm.checkpoint import LLM_JSON, UMM_JSON
    from umm.tokenizer import check_special_tokens

    checkpoint = Path(checkpoint)
    prompter = Prompter.from_checkpoint(checkpoint)
    config_file = checkpoint / (UMM_JSON if (checkpoint / UMM_JSON).exists() else LLM_JSON)
    check_special_tokens(prompter.tok, model_cfg, config_file=config_file)
    return prompter


def save_policy(model: UnifiedModel, policy: PolicyConfig, directory: str | Path) -> Path:
    """The trained policy as a checkpoint `policy.checkpoint=<directory>` loads: LoRA folded into the
    base weights (the live model is not changed), the source checkpoint's tokenizer files beside it."""
    from umm.checkpoint import save_pretrained
    from umm.lora import merged_state_dict

    tokenizer = [Path(policy.checkpoint) / name for name in TOKENIZER_FILES]
    return save_pretrained(model, directory, state=merged_state_dict(model),
                           copy_files=[f for f in tokenizer if f.exists()])


@dataclass(frozen=True)
class PolicyFactory:
    """`factory()` builds the whole policy (rollout actors, sync mode). A ZeRO-3 learner instead builds
    `skeleton()` under `deepspeed.zero.Init` (partitioned as it is built), fills it from `weights()`
    bucket by bucket (actors.zero_build) and then calls `finish` (LoRA), so no rank ever holds the
    whole model. Picklable: it crosses into learner processes."""
    policy: PolicyConfig

    def __call__(self) -> UnifiedModel:
        return load_policy(self.policy)

    def skeleton(self) -> UnifiedModel:
        """The policy's modules with their trainable pattern; values are overwritten by `weights()`."""
        from umm.checkpoint import read_config
        return UnifiedModel(read_config(self.policy.checkpoint))

    def weights(self):
        """The checkpoint's tensors by parameter name, read one at a time (umm.checkpoint.CheckpointTensors)."""
        from umm.checkpoint import CheckpointTensors, read_config
        return CheckpointTensors(self.policy.checkpoint, read_config(self.policy.checkpoint))

    def finish(self, model: UnifiedModel) -> UnifiedModel:
        """What `load_policy` does after loading: the LoRA adapters when LoRA is on."""
        return with_lora(model, self.policy)
