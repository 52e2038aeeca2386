"""The attention rule: as a table (vs a plain loop) and as behaviour of the real model."""
import random

import torch

from umm.sequence import Segment, pack

from tests.umm.helpers import rand_image, tiny_model


def _loop_mask(kinds, lengths, hidden_flags):
    """Independent statement of the rule, token by token."""
    seg_of = [s for s, n in enumerate(lengths) for _ in range(n)]
    L = len(seg_of)
    starts = [sum(lengths[:s]) for s in range(len(lengths))]
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            si, sj = seg_of[i], seg_of[j]
            if sj < si:
                m[i, j] = not hidden_flags[sj]
            elif sj == si:
                m[i, j] = kinds[si] == "image" or (j - starts[sj]) <= (i - starts[si])
    return m


def test_mask_matches_a_token_by_token_statement_of_the_rule():
    rng = random.Random(0)
    for _ in range(30):
        n_seg = rng.randint(1, 5)
        kinds = [rng.choice(["text", "image"]) for _ in range(n_seg)]
        lengths = [rng.randint(1, 5) for _ in range(n_seg)]
        hidden = [k == "image" and rng.random() < 0.3 for k in kinds]
        segs = [Segment(embeds=torch.zeros(n, 4), gen=torch.zeros(n, dtype=torch.bool), full=k == "image",
                        shared_position=k == "image", hidden_from_later=h)
                for k, n, h in zip(kinds, lengths, hidden)]
        short = [Segment(embeds=torch.zeros(1, 4), gen=torch.zeros(1, dtype=torch.bool), full=False,
                         shared_position=False)]
        p = pack([segs, short])
        L = sum(lengths)
        assert torch.equal(p.attn_mask[0, :L, :L], _loop_mask(kinds, lengths, hidden))
        # the short row: its real token sees only itself; padding keys are never visible to it
        assert p.attn_mask[1, 0].tolist() == [True] + [False] * (L - 1)
        # positions: text consecutive, an image block shares one position
        pos, expect = 0, []
        for k, n in zip(kinds, lengths):
            expect += [pos] * n if k == "image" else list(range(pos, pos + n))
            pos += 1 if k == "image" else n
        assert p.position_ids[0, :L].tolist() == expect and int(p.next_pos[0]) == pos


def _hidden(model, rows):
    with torch.no_grad():
        return model.run(rows)[0]


def test_text_is_causal_and_image_tokens_see_each_other_and_the_context():
    model = tiny_model()
    hw = (2, 2)
    D = model.cfg.patch_latent_dim
    x = torch.randn(4, D)

    def rows(text_ids, x_lat, tail_ids):
        return [[model.text_segment(text_ids), model.latent_segment(x_lat, t=0.5, hw=hw),
                 model.text_segment(tail_ids)]]

    base = _hidden(model, rows([1, 5, 6, 7, 2], x, [1, 8, 9, 2]))
    # text causal: changing the 4th text token leaves the first three unchanged, changes later ones
    h = _hidden(model, rows([1, 5, 6, 50, 2], x, [1, 8, 9, 2]))
    assert torch.allclose(h[0, :3], base[0, :3], atol=1e-6)
    assert (h[0, 3:] - base[0, 3:]).abs().amax() > 1e-4
    # image block is full: changing the LAST latent token changes the FIRST one
    x2 = x.clone()
    x2[3] += 1.0
    h = _hidden(model, rows([1, 5, 6, 7, 2], x2, [1, 8, 9, 2]))
    assert (h[0, 6] - base[0, 6]).abs().amax() > 1e-4          # first latent token (after marker)
    assert torch.allclose(h[0, :5], base[0, :5], atol=1e-6)     # preceding text unaffected
    # latent tokens attend to the preceding context
    h = _hidden(model, rows([1, 5, 60, 7, 2], x, [1, 8, 9, 2]))
    assert (h[0, 5:11] - base[0, 5:11]).abs().amax() > 1e-4


def test_noisy_latents_hidden_from_later_tokens():
    model = tiny_model()
    D, hw = model.cfg.patch_latent_dim, (2, 2)

    def run(x_lat):
        return _hidden(model, [[model.text_segment([1, 5, 2]),
                                model.latent_segment(x_lat, t=0.8, hw=hw, hidden_from_later=True),
                                model.text_segment([1, 8, 9, 2])]])

    a, b = run(torch.randn(4, D)), run(torch.randn(4, D))
    assert torch.allclose(a[0, -4:], b[0, -4:], atol=1e-6)      # later text never saw the noise
    assert (a[0, 3:9] - b[0, 3:9]).abs().amax() > 1e-4


def test_a_row_does_not_depend_on_its_batch_neighbours():
    model = tiny_model()
    img = rand_image(8, 8)
    row_a = [model.text_segment([1, 5, 6, 2]), model.vit_segment(img)]
    row_b = [model.text_segment([1, 7, 8, 9, 10, 11, 12, 2])]
    alone = _hidden(model, [row_a])
    both = _hidden(model, [row_a, row_b])
    n = alone.shape[1]
    torch.testing.assert_close(both[0, :n], alone[0], atol=1e-5, rtol=1e-5)
