"""Autoencoders: pixel AE exactness, KL AE shapes, FLUX <-> diffusers layout, strict loading."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

from umm.config import VAEConfig, preset
from umm.errors import CheckpointError
from umm.vae import build_vae, diffusers_to_flux_ae, flux_ae_to_diffusers, load_ae, save_ae

# 3 levels with channel changes: exercises nin_shortcut and the decoder level reversal (tiny has neither).
THREE_LEVEL = VAEConfig(kind="kl", downsample=4, z_channels=4, block_out_channels=(8, 16, 16),
                        layers_per_block=1, norm_num_groups=8, scaling_factor=0.5, shift_factor=0.1)


@pytest.fixture(scope="module")
def tiny_vae_cfg():
    return preset("tiny").vae


def test_pixel_ae_is_exact_space_to_depth():
    cfg = VAEConfig(kind="pixel", downsample=4, z_channels=48)
    ae = build_vae(cfg)
    assert (ae.downsample, ae.z_channels, len(ae.state_dict())) == (4, 48, 0)
    x = torch.rand(2, 3, 8, 12) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 48, 2, 3)
    assert z[1, 2 * 16 + 1 * 4 + 3, 1, 2] == x[1, 2, 1 * 4 + 1, 2 * 4 + 3]   # channel c*d*d + i*d + j
    assert torch.equal(ae.decode(z), x)
    assert load_ae(None, cfg).z_channels == 48 and save_ae(ae, "unused") is None


def test_kl_ae_shapes_and_deterministic_normalised_mean(tiny_vae_cfg):
    ae = build_vae(THREE_LEVEL).eval()
    x = torch.rand(2, 3, 16, 8) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        assert z.shape == (2, 4, 4, 2) and torch.equal(z, ae.encode(x))
        mean = ae.kl.encode(x).latent_dist.mean
        torch.testing.assert_close(z, (mean - 0.1) * 0.5)
        assert ae.decode(z).shape == (2, 3, 16, 8)
        tiny = build_vae(tiny_vae_cfg)
        zt = tiny.encode(x)
        assert zt.shape == (2, tiny_vae_cfg.z_channels, 8, 4) and tiny.decode(zt).shape == x.shape
    with pytest.raises(ValueError, match="multiples of 4"):
        ae.encode(torch.zeros(1, 3, 6, 8))


@pytest.mark.parametrize("which", ["tiny", "three_level"])
def test_flux_layout_round_trip_and_agrees_with_diffusers_converter(which, tiny_vae_cfg):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ae = build_vae(tiny_vae_cfg if which == "tiny" else THREE_LEVEL)
    sd = ae.kl.state_dict()
    flux = diffusers_to_flux_ae(sd)
    assert all(k.startswith(("encoder.", "decoder.")) for k in flux)
    assert not any(s in k for k in flux for s in ("down_blocks", "up_blocks", "mid_block", "to_q", "conv_shortcut"))
    assert flux["encoder.mid.attn_1.q.weight"].ndim == 4
    back = flux_ae_to_diffusers(flux)
    assert list(back) == list(sd)
    assert all(back[k].shape == sd[k].shape and torch.equal(back[k], sd[k]) for k in sd)
    # diffusers' own LDM converter (flux -> diffusers) must agree with ours
    theirs = convert_ldm_vae_checkpoint(dict(flux), dict(ae.kl.config))
    assert set(theirs) == set(sd) and all(torch.equal(theirs[k], sd[k]) for k in sd)


def test_flux_layout_names_for_the_real_flux_config():
    with torch.device("meta"):
        ae = build_vae(VAEConfig())
    sd = ae.kl.state_dict()
    flux = diffusers_to_flux_ae(sd)
    shapes = {k: tuple(v.shape) for k, v in flux.items()}
    assert len(shapes) == 244
    expect = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.norm_out.weight": (512,),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.0.block.2.norm1.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    assert {k: shapes.get(k) for k in expect} == expect
    assert "decoder.up.0.upsample.conv.weight" not in shapes and "encoder.down.3.downsample.conv.weight" not in shapes
    back = flux_ae_to_diffusers(flux)
    assert list(back) == list(sd) and all(back[k].shape == sd[k].shape for k in sd)


def test_save_then_load_reproduces_weights(tmp_path):
    ae = build_vae(THREE_LEVEL)
    path = save_ae(ae, tmp_path / "ae.safetensors")
    assert "decoder.up.0.block.0.nin_shortcut.weight" in load_file(str(path))
    loaded = load_ae(path, THREE_LEVEL)
    ref = ae.kl.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.kl.state_dict().items())


@pytest.mark.parametrize("damage, needle", [
    ("missing", "1 missing: decoder.mid.attn_1.k.weight"),
    ("misnamed", "1 unexpected: encoder.conv_in.wieght"),
    ("shape", "encoder.conv_out.bias file (3,) vs model (8,)"),
])
def test_load_ae_strict_errors_name_key_and_file(tmp_path, damage, needle):
    flux = diffusers_to_flux_ae(build_vae(THREE_LEVEL).kl.state_dict())
    flux = {k: v.contiguous() for k, v in flux.items()}
    if damage == "missing":
        del flux["decoder.mid.attn_1.k.weight"]
    elif damage == "misnamed":
        flux["encoder.conv_in.wieght"] = flux.pop("encoder.conv_in.weight")
    else:
        flux["encoder.conv_out.bias"] = torch.zeros(3)
    path = tmp_path / f"{damage}.safetensors"
    save_file(flux, str(path))
    with pytest.raises(CheckpointError) as err:
        load_ae(path, THREE_LEVEL)
    msg = str(err.value)
    assert needle in msg and str(path) in msg
    if damage == "misnamed":
        assert "1 missing: encoder.conv_in.weight" in msg


def test_config_is_not_mutated_by_build(tiny_vae_cfg):
    before = dataclasses.asdict(tiny_vae_cfg)
    build_vae(tiny_vae_cfg)
    assert dataclasses.asdict(tiny_vae_cfg) == before
