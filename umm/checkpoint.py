"""Saving and loading in the public BAGEL-7B-MoT directory layout.

    llm_config.json   Qwen2-style config of the decoder (plus qk_norm / layer_module)
    vit_config.json   SigLIP config; like the public file it counts SigLIP's ORIGINAL layers —
                      the model drops the last one, so we write n + 1 and read n - 1
    ema.safetensors   every model tensor except the autoencoder, under BAGEL's names
    ae.safetensors    the autoencoder in the FLUX/LDM layout (none for the pixel-space AE)
    umm_config.json   our full config (special ids, AE kind); absent in the public release, whose
                      sizes `read_config` reads from the JSON files and the tensors' shapes, and whose
                      special ids come from the folder's tokenizer files (umm.tokenizer)
    tokenizer files   tokenizer.json, tokenizer_config.json, ...; prompt_format.json (umm.prompting)

Loading is strict: every expected tensor must be present with its shape, and nothing else; the
error names the file and lists missing / unexpected / mis-shaped keys. No code is executed from
the directory (no trust_remote_code); tensors come only from safetensors.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from umm.config import ConfigError, LLMConfig, SpecialTokens, UMMConfig, VAEConfig, ViTConfig
from umm.errors import CheckpointError, describe_mismatch
from umm.model import UnifiedModel
from umm.vae import load_ae, save_ae

EMA, AE, LLM_JSON, VIT_JSON, UMM_JSON = "ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json", "umm_config.json"


def _llm_json(cfg: LLMConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.update(model_type="qwen2", layer_module="Qwen2MoTDecoderLayer", architectures=["Qwen2ForCausalLM"])
    return d


def _vit_json(cfg: ViTConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.update(model_type="siglip_vision_model", num_hidden_layers=cfg.num_hidden_layers + 1)
    return d


def _pick(d: dict, cls, path: Path) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - d.keys())
    if missing:
        raise CheckpointError(f"{path}: missing config keys {missing}")
    return {k: v for k, v in d.items() if k in names}


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a safetensors file, read from its header alone."""
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _need(shapes: dict[str, tuple[int, ...]], name: str, path: Path) -> tuple[int, ...]:
    if name not in shapes:
        raise CheckpointError(f"{path}: tensor {name!r} not found (needed to read the model's sizes)")
    return shapes[name]


def _side(n: int, name: str, path: Path) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"{path}: {name} has {n} rows, not a square grid of positions")
    return side


def ae_config(path: Path) -> VAEConfig:
    """The FLUX-layout autoencoder's sizes from its tensors' shapes (ae.safetensors).

    Levels, channels per level, resnet blocks per level and latent channels are read from the
    encoder's tensors; GroupNorm's group count is not stored in the file: the largest of 32 (FLUX),
    16, ..., 1 that divides every level's channels. The latent scale and shift are FLUX's."""
    shapes = tensor_shapes(path)
    levels = sorted({int(m[1]) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.block\.0\.conv2", k))})
    if not levels or levels != list(range(len(levels))):
        raise CheckpointError(f"{path}: no FLUX-layout encoder levels (encoder.down.<i>.block.0.conv2.weight)")
    channels = tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in levels)
    blocks = len({m[1] for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    z2 = _need(shapes, "encoder.conv_out.weight", path)[0]
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))
    return VAEConfig(kind="kl", downsample=2 ** (len(channels) - 1), z_channels=z2 // 2, block_out_channels=channels,
                     layers_per_block=blocks, norm_num_groups=groups)


def read_config(directory: str | Path, *, tokens: SpecialTokens | None = None) -> UMMConfig:
    """The model's config from its folder alone, no preset.

    Our umm_config.json when present. Otherwise the public BAGEL layout: the decoder and SigLIP from
    llm_config.json / vit_config.json; the latent patch, latent and ViT position grids from the tensor
    shapes in ema.safetensors (vae2llm, latent_pos_embed, vit_pos_embed); the autoencoder from
    ae.safetensors (`ae_config`); the special ids from the folder's tokenizer (umm.tokenizer), unless
    `tokens` gives them."""
    directory = Path(directory)
    if (directory / UMM_JSON).exists():
        return UMMConfig.load(directory / UMM_JSON)
    for name in (LLM_JSON, VIT_JSON):
        if not (directory / name).exists():
            raise CheckpointError(f"{directory}: neither {UMM_JSON} nor {name} found")
    llm = json.loads((directory / LLM_JSON).read_text())
    if "rope_theta" not in llm and isinstance(llm.get("rope_parameters"), dict):
        llm["rope_theta"] = llm["rope_parameters"].get("rope_theta")
    vit = json.loads((directory / VIT_JSON).read_text())
    llm_cfg = LLMConfig(**_pick(llm, LLMConfig, directory / LLM_JSON))
    vit_kwargs = _pick(vit, ViTConfig, directory / VIT_JSON)
    vit_kwargs["num_hidden_layers"] -= 1
    vae = ae_config(directory / AE)
    ema = directory / EMA
    shapes = tensor_shapes(ema)
    patch_dim = _need(shapes, "vae2llm.weight", ema)[1]
    patch = math.isqrt(patch_dim // vae.z_channels)
    if patch * patch * vae.z_channels != patch_dim:
        raise CheckpointError(f"{ema}: vae2llm.weight takes {patch_dim} inputs, not patch^2 x {vae.z_channels} "
                              f"latent channels ({directory / AE})")
    if tokens is None:
        from umm.tokenizer import load_tokenizer, special_tokens
        tokens = special_tokens(load_tokenizer(directory))
    cfg = UMMConfig(llm=llm_cfg, vit=ViTConfig(**vit_kwargs), vae=vae, tokens=tokens, latent_patch_size=patch,
                    max_latent_size=_side(_need(shapes, "latent_pos_embed.pos_embed", ema)[0],
                                          "latent_pos_embed.pos_embed", ema),
                    vit_max_num_patch_per_side=_side(_need(shapes, "vit_pos_embed.pos_embed", ema)[0],
                                                     "vit_pos_embed.pos_embed", ema))
    try:
        return cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{directory}: {e} ({LLM_JSON}, {VIT_JSON}, tokenizer files)") from None


def model_state(model: UnifiedModel) -> dict[str, torch.Tensor]:
    """The ema.safetensors tensors: everything but the autoencoder (LoRA must be merged first)."""
    state = model.state_dict()
    if any(".lora_" in k or ".base_layer." in k for k in state):
        raise CheckpointError("model has LoRA adapters; call umm.lora.merge_lora(model) before saving")
    return _without_ae(state)


def _without_ae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's tensors live in ae.safetensors, not ema.safetensors."""
    return {k: v for k, v in state.items() if not k.startswith("vae.")}


def save_pretrained(model: UnifiedModel, directory: str | Path, *, state: dict[str, torch.Tensor] | None = None,
                    copy_files: Sequence[Path] = (), public_layout: bool = False) -> Path:
    """Write the checkpoint directory (files first to *.tmp, then renamed: never half-written).
    `state`: the tensors to write instead of `model_state(model)` (e.g. `umm.lora.merged_state_dict`);
    autoencoder tensors in it are left to ae.safetensors. `copy_files` (e.g. a tokenizer) are copied
    in under their own names the same way. `public_layout`: no umm_config.json, as BAGEL publishes it
    (then the folder must carry the tokenizer the special ids are read from)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model_state(model) if state is None else _without_ae(state)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    writes = [(EMA, lambda p: save_file(state, str(p), metadata={"format": "pt"})),
              (LLM_JSON, lambda p: p.write_text(json.dumps(_llm_json(model.cfg.llm), indent=2))),
              (VIT_JSON, lambda p: p.write_text(json.dumps(_vit_json(model.cfg.vit), indent=2))),
              (AE, lambda p: save_ae(model.vae, p))]
    if not public_layout:
        writes.append((UMM_JSON, lambda p: model.cfg.save(p)))
    writes += [(src.name, lambda p, src=src: shutil.copyfile(src, p)) for src in map(Path, copy_files)]
    for name, write in writes:
        tmp = directory / (name + ".tmp")
        write(tmp)
        if tmp.exists():
            tmp.replace(directory / name)
    return directory


def check_state(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], *, path: Path) -> None:
    """Raise CheckpointError naming `path` unless names and shapes match exactly."""
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    shapes = [f"{k} file {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(expected.keys() & found.keys()) if tuple(expected[k].shape) != tuple(found[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointError(describe_mismatch(path, missing=missing, unexpected=unexpected, shape_mismatch=shapes))


def load_pretrained(directory: str | Path, *, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", tokens: SpecialTokens | None = None) -> UnifiedModel:
    """Build the model from a checkpoint directory (ours, or any public BAGEL-layout one: see
    `read_config`). Weights are materialised straight from the file (the model is built on the meta
    device first), so a 14B checkpoint is read once."""
    directory = Path(directory)
    if not (directory / EMA).exists():
        raise CheckpointError(f"{directory / EMA}: file not found")
    cfg = read_config(directory, tokens=tokens)
    with torch.device("meta"):
        model = UnifiedModel(cfg)
    expected = model_state(model)
    found = load_file(str(directory / EMA), device=str(device))
    check_state(expected, found, path=directory / EMA)
    # copy=True: fresh, aligned allocations (tensors viewing the file's buffer can take other
    # SIMD paths and differ in the last bit) that do not pin the file in memory
    model.load_state_dict({k: v.to(dtype=dtype, copy=True) for k, v in found.items()}, strict=False, assign=True)
    model.vae = load_ae(directory / AE, cfg.vae).to(device=device, dtype=dtype).requires_grad_(False)
    # non-persistent buffers (RoPE frequencies) are rebuilt, not loaded
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding
    model.language_model.model.rotary_emb = Qwen2RotaryEmbedding(cfg.llm.to_qwen2()).to(device)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(f"{directory}: tensors left uninitialised after loading: {leftover[:10]}")
    return model.eval()


class CheckpointTensors:
    """A checkpoint's tensors under the model's parameter names, read one at a time.

    For building a model that is already partitioned (ZeRO-3 `zero.Init`): nothing is loaded up
    front except the autoencoder (small, and stored in FLUX names that need the full mapping);
    `get` reads one tensor of ema.safetensors when it is asked for."""

    def __init__(self, directory: str | Path, cfg: UMMConfig):
        from safetensors import safe_open

        self.directory = Path(directory)
        self.path = self.directory / EMA
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: file not found")
        self._file = safe_open(str(self.path), framework="pt", device="cpu")
        self.shapes: dict[str, tuple[int, ...]] = {
            k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
        self._ae = {f"vae.{k}": v for k, v in load_ae(self.directory / AE, cfg.vae).state_dict().items()}
        self.shapes.update({k: tuple(v.shape) for k, v in self._ae.items()})

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Raise CheckpointError naming the file unless names and shapes are exactly `expected`'s."""
        as_meta = lambda shapes: {k: torch.empty(s, device="meta") for k, s in shapes.items()}  # noqa: E731
        check_state(as_meta(expected), as_meta(self.shapes), path=self.path)

    def get(self, name: str) -> torch.Tensor:
        if name in self._ae:
            return self._ae[name]
        return self._file.get_tensor(name)
