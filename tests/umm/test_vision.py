"""SigLIP NaViT encoder: patch order, names, per-image attention, preprocessing."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from umm.config import preset
from umm.vision import (MLPConnector, SiglipNavitVisionModel, image_to_vit_tensor, patchify, unpatchify)


def test_patchify_element_order_matches_loop():
    c, p, h, w = 3, 2, 2, 3
    img = torch.randn(c, h * p, w * p)
    tok = patchify(img, p)
    assert tok.shape == (h * w, p * p * c)
    for i in range(h):
        for j in range(w):
            for a in range(p):
                for b in range(p):
                    for ch in range(c):
                        assert tok[i * w + j, (a * p + b) * c + ch] == img[ch, i * p + a, j * p + b]
    assert torch.equal(unpatchify(tok, h, w, p, c), img)
    with pytest.raises(ValueError, match="multiple of patch size"):
        patchify(torch.zeros(3, 5, 4), 2)


def test_linear_on_patches_equals_conv_with_permuted_weight():
    # BAGEL stores SigLIP's conv patch embedding as a linear whose weight is conv.weight.permute(0, 2, 3, 1).
    c, p, d = 3, 4, 8
    conv_w, bias = torch.randn(d, c, p, p), torch.randn(d)
    img = torch.randn(c, 3 * p, 2 * p)
    via_conv = F.conv2d(img[None], conv_w, bias, stride=p)[0].flatten(1).T      # (h*w, d), row-major
    via_linear = F.linear(patchify(img, p), conv_w.permute(0, 2, 3, 1).reshape(d, -1), bias)
    torch.testing.assert_close(via_linear, via_conv, rtol=1e-5, atol=1e-5)


def test_state_dict_names_and_shapes_tiny():
    cfg = preset("tiny")
    vm = SiglipNavitVisionModel(cfg.vit, cfg.vit_max_num_patch_per_side)
    sd = {k: tuple(v.shape) for k, v in vm.state_dict().items()}
    d, p, m = cfg.vit.hidden_size, cfg.vit.patch_size, cfg.vit_max_num_patch_per_side
    assert sd["vision_model.embeddings.patch_embedding.weight"] == (d, p * p * 3)
    assert sd["vision_model.embeddings.position_embedding.weight"] == (m * m, d)
    assert sd["vision_model.encoder.layers.0.self_attn.q_proj.weight"] == (d, d)
    assert sd["vision_model.encoder.layers.0.mlp.fc1.weight"] == (cfg.vit.intermediate_size, d)
    assert sd["vision_model.post_layernorm.weight"] == (d,)
    assert len(sd) == 3 + 16 * cfg.vit.num_hidden_layers + 2
    assert not any("head" in k or "rope" in k for k in sd)
    conn = MLPConnector(d, cfg.llm.hidden_size, cfg.connector_act)
    assert {k: tuple(v.shape) for k, v in conn.state_dict().items()} == {
        "fc1.weight": (cfg.llm.hidden_size, d), "fc1.bias": (cfg.llm.hidden_size,),
        "fc2.weight": (cfg.llm.hidden_size, cfg.llm.hidden_size), "fc2.bias": (cfg.llm.hidden_size,)}
    assert conn(torch.randn(5, d)).shape == (5, cfg.llm.hidden_size)


def test_images_of_different_sizes_do_not_attend_to_each_other():
    torch.manual_seed(0)
    cfg = preset("tiny")
    vm = SiglipNavitVisionModel(cfg.vit, cfg.vit_max_num_patch_per_side).eval()
    p = cfg.vit.patch_size
    a, b = torch.randn(3, 2 * p, 3 * p), torch.randn(3, 4 * p, 4 * p)
    with torch.no_grad():
        (ta, tb), (ia, ib) = vm([a, b])
        (ta2, _), _ = vm([a, torch.randn(3, 4 * p, 4 * p)])
        (ta_alone,), _ = vm([a])
        (tb_first, _), _ = vm([b, a])
    assert ta.shape == (6, cfg.vit.hidden_size) and tb.shape == (16, cfg.vit.hidden_size)
    assert ia.tolist() == [0, 1, 2, 16, 17, 18] and ib.shape == (16,)
    torch.testing.assert_close(ta, ta2)
    torch.testing.assert_close(ta, ta_alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tb, tb_first, rtol=1e-5, atol=1e-5)


def test_image_to_vit_tensor_sizes_and_range():
    arr = np.zeros((50, 30, 3), dtype=np.uint8)
    arr[..., 0] = 255
    x = image_to_vit_tensor(arr, patch_size=14, max_side_px=980)
    assert x.shape == (3, 56, 28) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(())) and torch.allclose(x[1], -torch.ones(()))
    big = Image.new("RGB", (2000, 1000))
    y = image_to_vit_tensor(big, patch_size=14, max_side_px=980)
    assert y.shape[1] % 14 == 0 and y.shape[2] % 14 == 0 and max(y.shape[1:]) <= 980
    z = image_to_vit_tensor(torch.zeros(3, 20, 10, dtype=torch.uint8), patch_size=4, max_side_px=64, min_side_px=40)
    assert z.shape == (3, 64, 40)
