"""Loading from the public BAGEL-7B-MoT layout, clear errors, and save -> load round trips."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from umm.checkpoint import load_pretrained, save_pretrained
from umm.config import preset
from umm.context import Text, encode_context
from umm.errors import CheckpointError
from umm.vae import build_vae, diffusers_to_flux_ae

from tests.umm.helpers import public_tiny_config, rand_image, tiny_model


def bagel_tensor_names(n_layers: int, n_vit_layers: int) -> list[str]:
    """The tensor names of BAGEL-7B-MoT's ema.safetensors, written out from the public checkpoint's
    index (not from our model), per layer."""
    names = ["language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
             "language_model.model.norm_moe_gen.weight", "language_model.lm_head.weight",
             "time_embedder.mlp.0.weight", "time_embedder.mlp.0.bias", "time_embedder.mlp.2.weight",
             "time_embedder.mlp.2.bias", "vae2llm.weight", "vae2llm.bias", "llm2vae.weight", "llm2vae.bias",
             "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed", "connector.fc1.weight",
             "connector.fc1.bias", "connector.fc2.weight", "connector.fc2.bias",
             "vit_model.vision_model.embeddings.patch_embedding.weight",
             "vit_model.vision_model.embeddings.patch_embedding.bias",
             "vit_model.vision_model.embeddings.position_embedding.weight",
             "vit_model.vision_model.post_layernorm.weight", "vit_model.vision_model.post_layernorm.bias"]
    for i in range(n_layers):
        p = f"language_model.model.layers.{i}."
        for s in ("", "_moe_gen"):
            for proj in ("q_proj", "k_proj", "v_proj"):
                names += [f"{p}self_attn.{proj}{s}.weight", f"{p}self_attn.{proj}{s}.bias"]
            names += [f"{p}self_attn.o_proj{s}.weight", f"{p}self_attn.q_norm{s}.weight",
                      f"{p}self_attn.k_norm{s}.weight", f"{p}input_layernorm{s}.weight",
                      f"{p}post_attention_layernorm{s}.weight"]
            names += [f"{p}mlp{s}.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    for i in range(n_vit_layers):
        p = f"vit_model.vision_model.encoder.layers.{i}."
        for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"{p}{m}.weight", f"{p}{m}.bias"]
    return names


def _write_public_layout(tmp_path, model):
    """A synthetic checkpoint directory as published: JSON configs + ema + ae (no umm_config.json)."""
    cfg = model.cfg
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vae.")}
    expected = bagel_tensor_names(cfg.llm.num_hidden_layers, cfg.vit.num_hidden_layers)
    assert sorted(state) == sorted(expected)       # our names ARE the public names
    save_file({k: state[k].contiguous() for k in expected}, str(tmp_path / "ema.safetensors"))
    save_file(diffusers_to_flux_ae(model.vae.kl.state_dict()), str(tmp_path / "ae.safetensors"))
    llm = dict(vocab_size=cfg.llm.vocab_size, hidden_size=cfg.llm.hidden_size,
               intermediate_size=cfg.llm.intermediate_size, num_hidden_layers=cfg.llm.num_hidden_layers,
               num_attention_heads=cfg.llm.num_attention_heads, num_key_value_heads=cfg.llm.num_key_value_heads,
               rms_norm_eps=1e-6, rope_theta=cfg.llm.rope_theta, max_position_embeddings=2048,
               qk_norm=True, tie_word_embeddings=False, layer_module="Qwen2MoTDecoderLayer",
               model_type="qwen2", torch_dtype="bfloat16")
    vit = dict(hidden_size=cfg.vit.hidden_size, intermediate_size=cfg.vit.intermediate_size,
               num_hidden_layers=cfg.vit.num_hidden_layers + 1,   # SigLIP's count; BAGEL drops the last
               num_attention_heads=cfg.vit.num_attention_heads, patch_size=cfg.vit.patch_size,
               image_size=980, model_type="siglip_vision_model")
    (tmp_path / "llm_config.json").write_text(json.dumps(llm))
    (tmp_path / "vit_config.json").write_text(json.dumps(vit))
    return tmp_path


def _outputs(model):
    img = rand_image(8, 8, seed=4)
    with torch.no_grad():
        cache = encode_context(model, [[Text(ids=(5, 6, 7))]])
        tokens, hw = model.image_to_tokens(img[None])
        v = model.velocity(tokens, torch.tensor([0.6]), hw=hw, cache=cache)
        hidden, _, _ = model.run([[model.text_segment([1, 5, 2]), model.vit_segment(img)]])
    return v, model.text_logits(hidden)


def test_public_layout_loads_and_reproduces_outputs(tmp_path):
    """No preset: every size is read from the JSON files and the tensors' shapes (the ids are given
    here: this folder has no tokenizer; tests/umm/test_tokenizer.py reads them from one)."""
    model = tiny_model(cfg=public_tiny_config())
    d = _write_public_layout(tmp_path, model)
    loaded = load_pretrained(d, tokens=model.cfg.tokens)
    assert loaded.cfg == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(a, b)


def test_save_load_round_trip_is_identical(tmp_path):
    model = tiny_model(seed=3)
    save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "ae.safetensors", "ema.safetensors", "llm_config.json", "umm_config.json", "vit_config.json"]
    loaded = load_pretrained(tmp_path / "ckpt")
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(a, b)
    bf16 = load_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert bf16.language_model.lm_head.weight.dtype == torch.bfloat16


def test_pixel_autoencoder_preset_round_trip(tmp_path):
    cfg = preset("tiny")
    cfg.vae.kind, cfg.vae.downsample, cfg.vae.z_channels = "pixel", 2, 12
    from umm.model import UnifiedModel
    model = UnifiedModel(cfg.validate()).eval()
    save_pretrained(model, tmp_path)
    assert not (tmp_path / "ae.safetensors").exists()
    loaded = load_pretrained(tmp_path)
    for a, b in zip(_outputs(model), _outputs(loaded)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["missing", "misnamed", "shape"])
def test_damaged_checkpoint_names_the_tensor_and_the_file(tmp_path, damage):
    model = tiny_model(cfg=public_tiny_config())
    d = _write_public_layout(tmp_path, model)
    state = load_file(str(d / "ema.safetensors"))
    key = "language_model.model.layers.1.self_attn.k_proj_moe_gen.weight"
    if damage == "missing":
        del state[key]
    elif damage == "misnamed":
        state[key.replace("k_proj_moe_gen", "k_proj_gen")] = state.pop(key)
    else:
        state[key] = torch.zeros(3, 3)
    save_file(state, str(d / "ema.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(d, tokens=model.cfg.tokens)
    msg = str(e.value)
    assert "ema.safetensors" in msg and key in msg
    if damage == "misnamed":
        assert "unexpected" in msg and "k_proj_gen" in msg


def test_missing_files_and_lora_state_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "ema.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="llm_config.json"):
        load_pretrained(tmp_path)
    from umm.lora import LoRAConfig, apply_lora
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=2, alpha=4))
    with pytest.raises(CheckpointError, match="merge_lora"):
        save_pretrained(model, tmp_path / "x")


def test_bagel_7b_mot_preset_has_the_public_checkpoint_structure():
    """Built on the meta device (no memory): the exact public tensor names and key shapes."""
    from umm.model import UnifiedModel
    from umm.checkpoint import model_state
    with torch.device("meta"):
        model = UnifiedModel(preset("bagel-7b-mot"))
    state = model_state(model)
    assert sorted(state) == sorted(bagel_tensor_names(28, 26))
    shapes = {
        "language_model.model.embed_tokens.weight": (152064, 3584),
        "language_model.model.layers.0.self_attn.q_proj.weight": (3584, 3584),
        "language_model.model.layers.0.self_attn.k_proj_moe_gen.weight": (512, 3584),  # 4 kv heads x 128
        "language_model.model.layers.0.self_attn.q_norm.weight": (128,),
        "language_model.model.layers.27.mlp_moe_gen.down_proj.weight": (3584, 18944),
        "vit_model.vision_model.embeddings.patch_embedding.weight": (1152, 14 * 14 * 3),
        "vit_model.vision_model.embeddings.position_embedding.weight": (70 * 70, 1152),
        "connector.fc1.weight": (3584, 1152),
        "vit_pos_embed.pos_embed": (70 * 70, 3584),
        "latent_pos_embed.pos_embed": (64 * 64, 3584),
        "vae2llm.weight": (3584, 2 * 2 * 16),
        "llm2vae.weight": (2 * 2 * 16, 3584),
        "time_embedder.mlp.0.weight": (3584, 256),
    }
    for k, shape in shapes.items():
        assert tuple(state[k].shape) == shape, k
    n_params = sum(v.numel() for v in state.values())
    assert 14.0e9 < n_params < 14.8e9          # "7B active, 14B total"
    assert model.vae.kl.config.latent_channels == 16
