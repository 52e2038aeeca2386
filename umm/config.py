"""Configuration of the unified multimodal model (BAGEL architecture) and its presets.

One dataclass per component, each validated with errors that name the offending key.
The `bagel-7b-mot` preset reproduces the public BAGEL-7B-MoT checkpoint's dimensions
(Qwen2.5-7B language model, SigLIP-so400m minus its last layer, FLUX autoencoder);
`tiny` is the same code at toy sizes for tests (head_dim 32, so vLLM can serve the family).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass(kw_only=True)
class LLMConfig:
    """The decoder: Qwen2 blocks, each layer holding an understanding and a generation expert."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    qk_norm: bool = True                 # RMSNorm on per-head queries/keys (BAGEL adds it to Qwen2)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, prefix: str = "llm") -> None:
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads"):
            _check(getattr(self, k) > 0, f"{prefix}.{k}", "must be positive")
        _check(self.hidden_size % self.num_attention_heads == 0, f"{prefix}.hidden_size",
               f"{self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, f"{prefix}.num_key_value_heads",
               "must divide num_attention_heads")
        _check(self.head_dim % 2 == 0, f"{prefix}.hidden_size", "head_dim must be even for RoPE")

    def to_qwen2(self):
        from transformers import Qwen2Config
        return Qwen2Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_word_embeddings, hidden_act=self.hidden_act,
        )


@dataclass(kw_only=True)
class ViTConfig:
    """SigLIP vision encoder (NaViT-style: variable resolution, flattened 2-D position ids)."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    def validate(self, prefix: str = "vit") -> None:
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "patch_size"):
            _check(getattr(self, k) > 0, f"{prefix}.{k}", "must be positive")
        _check(self.hidden_size % self.num_attention_heads == 0, f"{prefix}.hidden_size",
               "must be divisible by num_attention_heads")


@dataclass(kw_only=True)
class VAEConfig:
    """Image autoencoder.

    kind="kl": diffusers AutoencoderKL (the FLUX 16-channel AE for the real model, a small one for tiny).
    kind="pixel": a parameter-free space-to-depth 'autoencoder' (pixels in [-1, 1] folded into
    `downsample`x`downsample` blocks); used by the embedded shapes world, documented in docs/umm.md.
    """
    kind: str = "kl"
    downsample: int = 8
    z_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159

    def validate(self, prefix: str = "vae") -> None:
        _check(self.kind in ("kl", "pixel"), f"{prefix}.kind", f"{self.kind!r} not in ['kl', 'pixel']")
        _check(self.downsample >= 1, f"{prefix}.downsample", "must be >= 1")
        if self.kind == "pixel":
            _check(self.z_channels == 3 * self.downsample ** 2, f"{prefix}.z_channels",
                   f"pixel AE needs 3*downsample^2 = {3 * self.downsample ** 2}")
        else:
            _check(2 ** (len(self.block_out_channels) - 1) == self.downsample, f"{prefix}.downsample",
                   f"{self.downsample} does not match {len(self.block_out_channels)} blocks "
                   f"(2^(n-1) = {2 ** (len(self.block_out_channels) - 1)})")
            _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
                   f"{prefix}.norm_num_groups", "must divide every block_out_channels entry")


@dataclass(kw_only=True)
class SpecialTokens:
    """Token ids the model itself needs (Qwen2.5 names in comments)."""
    bos: int            # <|im_start|>: opens every text segment, starts generation
    eos: int            # <|im_end|>: closes a text segment, ends generation
    start_of_image: int  # <|vision_start|>
    end_of_image: int    # <|vision_end|>
    pad: int             # never attended to; fills ragged batches


@dataclass(kw_only=True)
class UMMConfig:
    """The whole unified model: decoder + understanding path + generation path."""
    llm: LLMConfig
    vit: ViTConfig
    vae: VAEConfig
    tokens: SpecialTokens
    latent_patch_size: int = 2           # latents are patchified p x p before entering the decoder
    max_latent_size: int = 64            # max latent tokens per side (64 -> 1024 px with the FLUX AE)
    vit_max_num_patch_per_side: int = 70
    connector_act: str = "gelu_pytorch_tanh"
    timestep_shift: float = 1.0          # training-time shift of the flow timestep (sampling has its own)

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: VAE downsampling x latent patch size."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size ** 2 * self.vae.z_channels

    def validate(self) -> "UMMConfig":
        self.llm.validate()
        self.vit.validate()
        self.vae.validate()
        _check(self.latent_patch_size >= 1, "latent_patch_size", "must be >= 1")
        _check(self.max_latent_size >= 1, "max_latent_size", "must be >= 1")
        _check(self.timestep_shift > 0, "timestep_shift", "must be > 0")
        for k, v in dataclasses.asdict(self.tokens).items():
            _check(0 <= v < self.llm.vocab_size, f"tokens.{k}", f"id {v} outside vocab of {self.llm.vocab_size}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UMMConfig":
        d = dict(d)
        try:
            vae = dict(d.pop("vae"))
            vae["block_out_channels"] = tuple(vae.get("block_out_channels", VAEConfig.block_out_channels))
            return cls(llm=LLMConfig(**d.pop("llm")), vit=ViTConfig(**d.pop("vit")), vae=VAEConfig(**vae),
                       tokens=SpecialTokens(**d.pop("tokens")), **d).validate()
        except (KeyError, TypeError) as e:
            raise ConfigError(f"invalid UMM config: {e}") from e

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> "UMMConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _tiny() -> UMMConfig:
    return UMMConfig(
        llm=LLMConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0,
                      max_position_embeddings=2048),
        vit=ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                      patch_size=4),
        vae=VAEConfig(kind="kl", downsample=2, z_channels=4, block_out_channels=(16, 16),
                      layers_per_block=1, norm_num_groups=8, scaling_factor=1.0, shift_factor=0.0),
        tokens=SpecialTokens(pad=0, bos=1, eos=2, start_of_image=3, end_of_image=4),
        latent_patch_size=2, max_latent_size=16, vit_max_num_patch_per_side=16,
    )


def _bagel_7b_mot() -> UMMConfig:
    # Qwen2.5-7B-Instruct dimensions and special ids; SigLIP-so400m-patch14 with its last layer dropped.
    return UMMConfig(
        llm=LLMConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, rope_theta=1_000_000.0,
                      max_position_embeddings=32768),
        vit=ViTConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                      patch_size=14),
        vae=VAEConfig(kind="kl", downsample=8, z_channels=16),
        tokens=SpecialTokens(pad=151643, bos=151644, eos=151645, start_of_image=151652, end_of_image=151653),
        latent_patch_size=2, max_latent_size=64, vit_max_num_patch_per_side=70,
    )


def _shapes() -> UMMConfig:
    # The embedded world's policy: pixel-space "AE" (2x2 space-to-depth) + 2x2 latent patches = 4x4-pixel
    # tokens, 64 per 32 px image; ids match shapes.tokenizer (vocab 155, padded to 160).
    return UMMConfig(
        llm=LLMConfig(vocab_size=160, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0,
                      max_position_embeddings=1024),
        vit=ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                      patch_size=8),   # 16 understanding tokens per 32 px image
        vae=VAEConfig(kind="pixel", downsample=2, z_channels=12, scaling_factor=1.0, shift_factor=0.0),
        tokens=SpecialTokens(pad=0, bos=1, eos=2, start_of_image=3, end_of_image=4),
        latent_patch_size=2, max_latent_size=16, vit_max_num_patch_per_side=16,
    )


PRESETS = {"tiny": _tiny, "shapes": _shapes, "bagel-7b-mot": _bagel_7b_mot}


def preset(name: str) -> UMMConfig:
    """A fresh, validated config for a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"preset: {name!r} not in {sorted(PRESETS)}")
    return PRESETS[name]().validate()
