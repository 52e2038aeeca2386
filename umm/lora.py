"""LoRA (through peft) on the attention and MLP linears of BOTH experts of the MoT decoder.

The method trains one adapter (rank 32, alpha 64) on q/k/v/o and gate/up/down of the
understanding expert and their `_moe_gen` twins. A wrong target list silently trains nothing —
the reward then stays flat — so `apply_lora` fails loudly when a requested expert or projection
matched zero modules, and returns the exact list it wrapped.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from umm.config import ConfigError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
EXPERTS = ("und", "gen")


class LoRATargetError(ValueError):
    """The LoRA target specification matched no (or not all requested) modules."""


@dataclass(kw_only=True)
class LoRAConfig:
    """Adapter settings; defaults are the method's (r 32, alpha 64, all attn + MLP linears, both experts)."""
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    projections: tuple[str, ...] = ATTN + MLP   # which linears inside each layer
    experts: tuple[str, ...] = EXPERTS          # "und" (text/ViT tokens), "gen" (latent tokens)

    def validate(self, prefix: str = "lora") -> "LoRAConfig":
        if self.rank < 1:
            raise ConfigError(f"{prefix}.rank: must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"{prefix}.alpha: must be > 0, got {self.alpha}")
        bad = [p for p in self.projections if p not in ATTN + MLP]
        if bad or not self.projections:
            raise ConfigError(f"{prefix}.projections: {bad or '[]'} not in {list(ATTN + MLP)}")
        bad = [e for e in self.experts if e not in EXPERTS]
        if bad or not self.experts:
            raise ConfigError(f"{prefix}.experts: {bad or '[]'} not in {list(EXPERTS)}")
        return self

    def target_regex(self) -> str:
        """Full-name regex of the decoder linears to wrap (never the ViT's same-named layers)."""
        suffixes = "|".join(s for s in ("" if "und" in self.experts else None,
                                        "_moe_gen" if "gen" in self.experts else None) if s is not None)
        attn = [p for p in self.projections if p in ATTN]
        mlp = [p for p in self.projections if p in MLP]
        alts = []
        if attn:
            alts.append(rf"self_attn\.({'|'.join(attn)})({suffixes})")
        if mlp:
            alts.append(rf"mlp({suffixes})\.({'|'.join(mlp)})")
        return rf"language_model\.model\.layers\.\d+\.({'|'.join(alts)})"


def expected_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    pat = re.compile(cfg.target_regex() + "$")
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pat.fullmatch(n)]


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Inject a LoRA adapter in place; freezes everything else. Returns the wrapped module names."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    cfg.validate()
    targets = expected_targets(model, cfg)
    for expert, suffix in (("und", ""), ("gen", "_moe_gen")):
        for proj in cfg.projections if expert in cfg.experts else ():
            if not any(re.search(rf"\.{proj}{suffix}$" if proj in ATTN else rf"mlp{suffix}\.{proj}$", n)
                       for n in targets):
                raise LoRATargetError(f"LoRA target {proj!r} of the {expert!r} expert matched no module "
                                      f"(regex {cfg.target_regex()!r})")
    model.requires_grad_(False)
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=targets, bias="none")
    inject_adapter_in_model(peft_cfg, model)
    wrapped = lora_module_names(model)
    if sorted(wrapped) != sorted(targets):
        raise LoRATargetError(f"peft wrapped {len(wrapped)} modules, expected {len(targets)}")
    return wrapped


def lora_module_names(model: nn.Module) -> list[str]:
    from peft.tuners.lora import LoraLayer
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable adapter tensors by name (what weight sync moves when LoRA is on)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base linear and remove the wrappers; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.get_base_layer())
            merged += 1
    return merged


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as if `merge_lora` had run, without changing the model: every adapted
    linear's weight is base + delta under the base layer's name, adapter tensors left out (a plain
    state dict when there is no LoRA)."""
    from peft.tuners.lora import LoraLayer

    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            key = f"{name}.base_layer.weight"
            with torch.no_grad():
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                state[key] = state[key] + delta
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[int]:
    """Run the base weights (the KL reference): every adapter off inside the block, back on after.

    Yields how many adapter layers were switched off (0 means the model has no LoRA: the
    "reference" would then be the policy itself, which callers should treat as an error)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.enable_adapters(True)
