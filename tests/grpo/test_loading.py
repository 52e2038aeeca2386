"""grpo.loading on the tiny public-layout BAGEL checkpoint (umm.make_tiny) and the shipped shapes policy:
LoRA when asked, the saved policy reloads as base + (alpha / r) B A computed here, the ZeRO-3 factory
builds what load_policy builds, and the prompter's check names the config file the ids came from."""
from dataclasses import replace

import pytest
import torch

from grpo.loading import LoRASection, PolicyConfig, PolicyFactory, load_policy, load_prompter, save_policy
from umm.checkpoint import load_pretrained, read_config
from umm.errors import CheckpointError
from umm.make_tiny import make_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-bagel"), seed=0)


def test_edit_guidance_defaults_to_text_and_image_cfg():
    cfg = PolicyConfig().edit_cfg          # an edit is guided by its instruction and by its source image
    assert cfg.uses_text and cfg.uses_image and cfg.renorm_type == "text_channel"


def test_lora_policy_trains_only_adapters_and_saves_as_base_plus_scaled_update(tiny_dir, tmp_path):
    rank, alpha = 4, 8.0
    policy = PolicyConfig(checkpoint=str(tiny_dir), lora=LoRASection(enabled=True, rank=rank, alpha=alpha))
    model = load_policy(policy)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:                        # B starts at zero: give the adapters an update
                p.normal_(0.0, 0.02)
    saved = save_policy(model, policy, tmp_path / "saved")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in saved.iterdir()}
    reloaded = load_policy(replace(policy, checkpoint=str(saved), lora=LoRASection(enabled=False)))
    base = load_pretrained(tiny_dir).state_dict()
    live = dict(model.named_parameters())
    got = reloaded.state_dict()
    adapted = [n.removesuffix(".lora_A.default.weight") for n in live if n.endswith(".lora_A.default.weight")]
    assert adapted
    for name in adapted:
        a, b = live[f"{name}.lora_A.default.weight"], live[f"{name}.lora_B.default.weight"]
        torch.testing.assert_close(got[f"{name}.weight"], base[f"{name}.weight"] + (alpha / rank) * b @ a)
    untouched = [k for k in base if not any(k == f"{n}.weight" for n in adapted)]
    assert all(torch.equal(got[k], base[k]) for k in untouched)
    assert ".lora_A." in "".join(live)                  # saving folded a copy: the live model keeps its adapters


@pytest.mark.parametrize("lora", [False, True])
def test_factory_skeleton_weights_finish_equals_load_policy(tiny_dir, lora):
    policy = PolicyConfig(checkpoint=str(tiny_dir), lora=LoRASection(enabled=lora, rank=4, alpha=8.0))
    factory = PolicyFactory(policy)
    whole = factory()
    skeleton = factory.skeleton()
    weights = factory.weights()                        # what a ZeRO-3 rank reads, one tensor at a time
    named = list(skeleton.named_parameters())
    weights.check({n: tuple(p.shape) for n, p in named})
    with torch.no_grad():
        for name, p in named:
            p.copy_(weights.get(name).to(p.dtype))
    built = factory.finish(skeleton)
    a, b = whole.state_dict(), built.state_dict()
    assert a.keys() == b.keys()
    for k in a:          # LoRA's A matrices are random draws (each path's own); B starts at zero in both
        assert a[k].shape == b[k].shape if ".lora_A." in k else torch.equal(a[k], b[k]), k
    assert [n for n, p in whole.named_parameters() if p.requires_grad] == \
        [n for n, p in built.named_parameters() if p.requires_grad]
    assert any(".lora_" in k for k in a) == lora


@pytest.mark.parametrize("folder,config_file", [("tiny", "llm_config.json"), ("shapes", "umm_config.json")])
def test_the_prompter_check_names_the_config_file_the_ids_came_from(tiny_dir, folder, config_file):
    checkpoint = tiny_dir if folder == "tiny" else "checkpoints/shapes-base"
    cfg = read_config(checkpoint)
    load_prompter(checkpoint, cfg)
    cfg.tokens.eos += 1
    with pytest.raises(CheckpointError, match=rf"gives eos .* but .*{config_file}"):
        load_prompter(checkpoint, cfg)


def test_policy_config_bounds_and_messages_name_the_nested_key():
    from umm.config import ConfigError
    ok = PolicyConfig()
    assert ok.validate() is ok
    replace(ok, canvas_size=1).validate()
    for bad, message in [(replace(ok, canvas_size=0), r"^policy\.canvas_size: must be >= 1, got 0"),
                         (replace(ok, lora=LoRASection(enabled=True, rank=0)), r"^policy\.lora\.rank"),
                         (replace(ok, think=replace(ok.think, top_p=0.0)), r"^policy\.think\.top_p"),
                         (replace(ok, flow=replace(ok.flow, shift=0.0)), r"^policy\.flow\.shift"),
                         (replace(ok, edit_cfg=replace(ok.edit_cfg, image_scale=0.5)), r"^policy\.edit_cfg\.image_scale")]:
        with pytest.raises(ConfigError, match=message):
            bad.validate()
    replace(ok, lora=LoRASection(enabled=False, rank=0)).validate()     # LoRA off: its settings are not read


def test_sampler_defaults_are_the_methods():
    """../shared/method-facts.md: edits are guided with text 4 and image 1.5-2, text-channel renorm; SRR's
    refinement: 40 steps, shift 3, an SDE window of 5 starting within the first 15 steps, noise level
    0.7, CFG text 4.0 / image 2.0."""
    from grpo.srr import SRRConfig
    edit = PolicyConfig().edit_cfg
    assert (edit.text_scale, edit.image_scale, edit.renorm_type) == (4.0, 1.5, "text_channel")
    f = SRRConfig().flow
    assert (f.num_steps, f.shift, f.window_size, f.window_start, f.noise_level) == (40, 3.0, 5, (0, 14), 0.7)
    assert (f.cfg.text_scale, f.cfg.image_scale, f.cfg.renorm_type) == (4.0, 2.0, "text_channel")
