"""Text sampling with log-probs, teacher forcing and the image hook (guidance: test_guidance.py)."""
import pytest
import torch

from umm.context import DrawPrompt, Image, Text, encode_context, encode_guidance
from umm.generation import generate_image, generate_text, sample_next, token_logprobs
from umm.guidance import CFGConfig

from tests.umm.helpers import rand_image, tiny_model


@pytest.mark.parametrize("batch", [1, 4])
def test_teacher_forced_logprobs_equal_sampled_ones(batch):
    model = tiny_model()
    rows = [[Text(ids=tuple(range(5, 5 + 2 + i)))] for i in range(batch)]
    with torch.no_grad():
        cache = encode_context(model, rows)
        s = generate_text(model, cache, max_new_tokens=10, temperature=0.9, top_p=0.95,
                          generator=torch.Generator().manual_seed(1))
        lp = token_logprobs(model, cache, s.tokens, s.mask, temperature=0.9)
    assert s.tokens.shape == s.mask.shape == s.logp.shape == lp.shape
    assert (s.logp[~s.mask] == 0).all() and (lp[~s.mask] == 0).all()
    assert (s.logp[s.mask] < 0).all()
    ratio = torch.exp((lp - s.logp).sum(1) / s.mask.sum(1))
    assert (ratio - 1).abs().max() < 1e-6


def test_generation_stops_at_im_end_and_pads_after():
    model = tiny_model()
    eos = model.cfg.tokens.eos
    old = model.language_model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos] = 4.0            # <|im_end|> now has probability ~0.3 per step
        model.language_model.lm_head = head
        cache = encode_context(model, [[Text(ids=(5, 6))], [Text(ids=(7,))], [Text(ids=(8,))]])
        s = generate_text(model, cache, max_new_tokens=40, temperature=1.0,
                          generator=torch.Generator().manual_seed(0))
    assert s.finished.all()
    assert len(set(s.mask.sum(1).tolist())) > 1          # rows ended at different lengths
    for b in range(3):
        n = int(s.mask[b].sum())
        assert s.tokens[b, n - 1] == eos and (s.tokens[b, n:] == model.cfg.tokens.pad).all()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]            # 0.705, 0.259, 0.035, 0.013
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, temperature=1.0, top_p=0.9, generator=g) for _ in range(400)])
    assert set(draws.flatten().tolist()) == {0, 1}   # 0.705 < 0.9 <= 0.705 + 0.259
    frac0 = (draws == 0).float().mean().item()
    assert abs(frac0 - probs[0] / (probs[0] + probs[1])) < 0.08
    assert sample_next(logits, temperature=0.0, top_p=1.0).item() == 0


def test_cache_is_not_modified_by_generation():
    model = tiny_model()
    with torch.no_grad():
        cache = encode_context(model, [[Text(ids=(5, 6, 7))]])
        k0 = cache.keys[0].clone()
        generate_text(model, cache, max_new_tokens=4)
    assert cache.length == 5 and torch.equal(cache.keys[0], k0)


def test_generate_image_uses_the_step_function_from_outside():
    model = tiny_model()
    with torch.no_grad():
        ctx = encode_guidance(model, [DrawPrompt(text=Text(ids=(5,)))], text_cfg=False, image_cfg=False)
        calls = []

        def step(x, v, t, t_next, i):
            calls.append((i, t, t_next))
            return x + v * (t_next - t)

        ts = torch.tensor([1.0, 0.75, 0.5, 0.0])
        noise = torch.randn(1, 4, model.cfg.patch_latent_dim)
        x = generate_image(model, ctx, noise=noise, hw=(2, 2), timesteps=ts, cfg=CFGConfig(text_scale=1.0),
                           step_fn=step)
        # an independent Euler loop over the conditional velocity
        ref = noise.clone()
        for i in range(3):
            ref = ref + model.velocity(ref, ts[i].expand(1), hw=(2, 2), cache=ctx.full) * (ts[i + 1] - ts[i])
    assert [c[0] for c in calls] == [0, 1, 2]
    torch.testing.assert_close(x, ref)
    assert model.tokens_to_image(x, (2, 2)).shape == (1, 3, 8, 8)


def test_image_cfg_needs_an_input_image():
    model = tiny_model()
    with pytest.raises(ValueError, match="input image"):
        encode_guidance(model, [DrawPrompt(text=Text(ids=(5,)))], text_cfg=True, image_cfg=True)


def test_the_model_can_answer_about_an_image():
    """Understanding path end to end: SigLIP tokens in the context condition the reply."""
    model = tiny_model()
    question = Text(ids=(40, 41, 42))
    with torch.no_grad():
        def first_token_logits(img):
            cache = encode_context(model, [[Image(pixels=img, vae=False, vit=True), question]])
            s = generate_text(model, cache, max_new_tokens=3, temperature=0.0)
            return s, token_logprobs(model, cache, s.tokens, s.mask)
        s1, lp1 = first_token_logits(rand_image(8, 8, seed=1))
        s2, lp2 = first_token_logits(rand_image(8, 8, seed=2))
    assert s1.tokens.shape[1] >= 1
    assert not torch.equal(lp1[:, 0], lp2[:, 0])    # the answer depends on the image
