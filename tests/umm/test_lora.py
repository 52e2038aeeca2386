"""LoRA wraps exactly the decoder linears of both experts; merged == unmerged."""
import pytest
import torch

from umm.config import ConfigError
from umm.lora import LoRAConfig, LoRATargetError, apply_lora, lora_parameters, merge_lora

from tests.umm.helpers import rand_image, tiny_model

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def _expected(n_layers, experts=("", "_moe_gen")):
    out = []
    for i in range(n_layers):
        for s in experts:
            out += [f"language_model.model.layers.{i}.self_attn.{p}{s}" for p in PROJ]
            out += [f"language_model.model.layers.{i}.mlp{s}.{p}" for p in MLP]
    return sorted(out)


def test_wraps_exactly_both_experts_attention_and_mlp():
    model = tiny_model()
    wrapped = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert sorted(wrapped) == _expected(model.cfg.llm.num_hidden_layers)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert set(trainable) == set(lora_parameters(model))
    assert not any(n.startswith("vit_model") for n in trainable)   # SigLIP's q_proj etc. untouched


def test_one_expert_only():
    model = tiny_model()
    wrapped = apply_lora(model, LoRAConfig(rank=2, alpha=4, experts=("gen",), projections=("q_proj",)))
    assert sorted(wrapped) == [f"language_model.model.layers.{i}.self_attn.q_proj_moe_gen" for i in range(2)]


def test_zero_matches_fail_loudly():
    model = tiny_model()
    model.language_model.model.layers = torch.nn.ModuleList()      # a model with no decoder layers
    with pytest.raises(LoRATargetError, match="matched no module"):
        apply_lora(model, LoRAConfig(rank=2, alpha=4))
    with pytest.raises(ConfigError, match="lora.projections"):
        LoRAConfig(projections=("qkv",)).validate()
    with pytest.raises(ConfigError, match="lora.experts"):
        LoRAConfig(experts=("vision",)).validate()


def test_merged_and_unmerged_outputs_agree():
    model = tiny_model()
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            p.normal_(0, 0.2)                       # lora_B starts at zero: make the adapter matter
    img = rand_image(8, 8)

    def outputs():
        with torch.no_grad():
            tokens, hw = model.image_to_tokens(img[None])
            hid, _, _ = model.run([[model.text_segment([1, 5, 6, 2]),
                                    model.latent_segment(tokens[0], t=0.5, hw=hw)]])
        return hid

    base = tiny_model()
    with torch.no_grad():
        hid_base, _, _ = base.run([[base.text_segment([1, 5, 6, 2]),
                                    base.latent_segment(base.image_to_tokens(img[None])[0][0], t=0.5, hw=(2, 2))]])
    unmerged = outputs()
    assert (unmerged - hid_base).abs().max() > 1e-3                # the adapter changes both experts' tokens
    assert merge_lora(model) == 2 * 7 * model.cfg.llm.num_hidden_layers
    merged = outputs()
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not lora_parameters(model)


def test_merged_state_dict_is_what_merging_gives_and_leaves_the_model_alone():
    import copy

    from umm.lora import merged_state_dict

    model = tiny_model()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.normal_(0, 0.2)
    by_hand = copy.deepcopy(model)
    merge_lora(by_hand)
    expected = by_hand.state_dict()
    state = merged_state_dict(model)
    assert state.keys() == expected.keys() == plain.keys()          # base names, no adapter tensors
    for k in expected:
        torch.testing.assert_close(state[k], expected[k], atol=0, rtol=0)
    changed = [k for k in plain if not torch.equal(state[k], plain[k])]
    assert len(changed) == 2 * 7 * model.cfg.llm.num_hidden_layers    # exactly the adapted weights moved
    assert lora_parameters(model)                                      # the live model keeps its adapters
    assert merged_state_dict(tiny_model()).keys() == plain.keys()      # no LoRA: the plain state dict
