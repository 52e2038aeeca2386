"""Timestep and 2-D position embeddings against hand computations."""
import math

import numpy as np
import pytest
import torch

from umm.config import preset
from umm.embeddings import PositionEmbedding, TimestepEmbedder, flattened_position_ids, timestep_frequencies


def test_flattened_position_ids_row_major_in_max_grid():
    ids = flattened_position_ids(2, 3, 5)
    assert ids.dtype == torch.long
    assert ids.tolist() == [0, 1, 2, 5, 6, 7]
    assert flattened_position_ids(1, 1, 4).tolist() == [0]
    with pytest.raises(ValueError, match="max_num_patch_per_side=4"):
        flattened_position_ids(5, 1, 4)


def test_timestep_frequencies_match_hand_computation():
    t = torch.tensor([0.0, 0.25, 1.0])
    dim, half = 8, 4
    got = timestep_frequencies(t, dim)
    for n, tn in enumerate(t.tolist()):
        for k in range(half):
            f = math.exp(-math.log(10000.0) * k / half)
            assert got[n, k].item() == pytest.approx(math.cos(tn * f), abs=1e-6)        # cos half first
            assert got[n, half + k].item() == pytest.approx(math.sin(tn * f), abs=1e-6)
    odd = timestep_frequencies(t, 7)
    assert odd.shape == (3, 7) and torch.all(odd[:, -1] == 0)


def test_timestep_embedder_names_and_shapes():
    hidden = preset("tiny").llm.hidden_size
    emb = TimestepEmbedder(hidden)
    shapes = {k: tuple(v.shape) for k, v in emb.state_dict().items()}
    assert shapes == {"mlp.0.weight": (hidden, 256), "mlp.0.bias": (hidden,),
                      "mlp.2.weight": (hidden, hidden), "mlp.2.bias": (hidden,)}
    assert emb(torch.rand(5)).shape == (5, hidden)


def _numpy_sincos_row(r: int, c: int, dim: int) -> np.ndarray:
    """Independent reference: column encoded in the first half, row in the second; [sin, cos] in each."""
    q = dim // 4
    omega = np.array([1.0 / 10000.0 ** (k / q) for k in range(q)])
    return np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])


def test_position_embedding_matches_numpy_sincos():
    g, dim = 6, 16
    pe = PositionEmbedding(g, dim)
    assert tuple(pe.pos_embed.shape) == (g * g, dim) and not pe.pos_embed.requires_grad
    assert list(pe.state_dict()) == ["pos_embed"]
    ref = np.stack([_numpy_sincos_row(i // g, i % g, dim) for i in range(g * g)])
    np.testing.assert_allclose(pe.pos_embed.numpy(), ref, atol=1e-6)
    ids = flattened_position_ids(2, 3, g)
    assert torch.equal(pe(ids), pe.pos_embed[ids])
    # omega_0 = 1: the first feature is sin(col), the (D/2)-th is sin(row)
    assert pe.pos_embed[2 * g + 5, 0].item() == pytest.approx(math.sin(5), abs=1e-6)
    assert pe.pos_embed[2 * g + 5, dim // 2].item() == pytest.approx(math.sin(2), abs=1e-6)


def test_position_embedding_rejects_hidden_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        PositionEmbedding(4, 6)
