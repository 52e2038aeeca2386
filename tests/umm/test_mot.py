"""The MoT decoder against transformers' own Qwen2, expert routing, and KV-cache equivalence."""
import pytest
import torch
from transformers import Qwen2ForCausalLM

from umm.context import Text, encode_context
from umm.generation import generate_text
from umm.sequence import Segment

from tests.umm.helpers import rand_image, tiny_model


def _qwen_from_expert(model, *, expert: str) -> Qwen2ForCausalLM:
    """A stock transformers Qwen2 holding one expert's weights of our decoder."""
    qwen = Qwen2ForCausalLM(model.cfg.llm.to_qwen2()).eval()
    state = {}
    for k, v in model.state_dict().items():
        if not k.startswith("language_model."):
            continue
        k = k[len("language_model."):]
        is_gen = "_moe_gen" in k
        if (expert == "gen") != is_gen and not k.startswith(("model.embed_tokens", "lm_head")):
            continue
        state[k.replace("_moe_gen", "")] = v
    qwen.load_state_dict(state, strict=True)
    return qwen


@pytest.mark.parametrize("expert", ["und", "gen"])
def test_each_expert_is_exactly_a_qwen2_decoder(expert):
    model = tiny_model(qk_norm=False)   # stock Qwen2 has no q/k norm
    qwen = _qwen_from_expert(model, expert=expert)
    ids = torch.randint(5, 128, (11,))
    seg = model.text_segment(ids)
    seg = Segment(embeds=seg.embeds, gen=torch.full_like(seg.gen, expert == "gen"), full=False,
                  shared_position=False)
    with torch.no_grad():
        hidden, _, _ = model.run([[seg]])
        ours = model.text_logits(hidden)[0]
        ref = qwen(input_ids=ids[None]).logits[0]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_mixed_routing_sends_each_token_through_its_own_expert():
    """In a mixed sequence, swapping the experts' weights and flipping every token's expert
    gives identical outputs: each token used exactly the expert its flag names."""
    model = tiny_model()
    swapped = tiny_model()
    sd = model.state_dict()
    new = {}
    for k, v in sd.items():
        if "_moe_gen" in k:
            new[k.replace("_moe_gen", "")] = v
        elif k.startswith("language_model.model.layers") or k.startswith("language_model.model.norm"):
            twin = k.replace(".weight", "_moe_gen.weight").replace(".bias", "_moe_gen.bias")
            # module-level twins: q_proj -> q_proj_moe_gen, mlp.x -> mlp_moe_gen.x, norm -> norm_moe_gen
            parts = k.split(".")
            for i, p in enumerate(parts):
                cand = ".".join(parts[:i] + [p + "_moe_gen"] + parts[i + 1:])
                if cand in sd:
                    twin = cand
                    break
            new[twin] = v
        else:
            new[k] = v
    swapped.load_state_dict(new, strict=True)
    e = torch.randn(9, model.cfg.llm.hidden_size)
    gen = torch.tensor([0, 0, 1, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    a = Segment(embeds=e, gen=gen, full=True, shared_position=False)
    b = Segment(embeds=e, gen=~gen, full=True, shared_position=False)
    with torch.no_grad():
        ha, _, _ = model.run([[a]])
        hb, _, _ = swapped.run([[b]])
    torch.testing.assert_close(ha, hb, atol=1e-6, rtol=1e-6)
    # and routing matters: the unswapped model disagrees with itself when flags flip
    with torch.no_grad():
        hc, _, _ = model.run([[b]])
    assert (ha - hc).abs().max() > 1e-3


def test_kv_cached_generation_equals_one_full_forward():
    model = tiny_model()
    ctx_ids = [9, 10, 11, 12]
    with torch.no_grad():
        cache = encode_context(model, [[Text(ids=tuple(ctx_ids))]])
        sample = generate_text(model, cache, max_new_tokens=12, temperature=1.0,
                               generator=torch.Generator().manual_seed(3))
        n = int(sample.mask[0].sum())
        gen = sample.tokens[0, :n]
        tok = model.cfg.tokens
        # one uncached forward over [ctx segment][<|im_start|> gen[:-1]] as two text segments
        rows = [[model.text_segment([tok.bos, *ctx_ids, tok.eos]),
                 model.text_segment([tok.bos, *gen[:-1].tolist()])]]
        hidden, packed, _ = model.run(rows)
        start = packed.spans[0][1][0]
        logits = model.text_logits(hidden[0, start:start + n])
        ref = torch.log_softmax(logits, -1).gather(-1, gen[:, None]).squeeze(-1)
    torch.testing.assert_close(sample.logp[0, :n], ref, atol=1e-5, rtol=0)


def test_every_path_runs_with_the_right_shapes():
    model = tiny_model()
    cfg = model.cfg
    img = rand_image(16, 24)
    with torch.no_grad():
        vit = model.vit_segment(img)
        assert vit.embeds.shape == ((16 // 4) * (24 // 4) + 2, cfg.llm.hidden_size)
        assert not vit.gen.any() and vit.full and vit.shared_position
        tokens, hw = model.image_to_tokens(img[None])
        assert hw == (4, 6) and tokens.shape == (1, 24, cfg.patch_latent_dim)
        lat = model.latent_segment(tokens[0], t=0.5, hw=hw)
        assert lat.gen.tolist() == [False] + [True] * 24 + [False]
        cache = model.encode([[model.text_segment([1, 5, 6, 2]), lat, vit]])
        assert cache.length == 4 + 26 + 26 and cache.next_pos.tolist() == [4 + 1 + 1]
        v = model.velocity(torch.randn(3, 24, cfg.patch_latent_dim), torch.full((3,), 0.7), hw=hw,
                           cache=cache.repeat_interleave(3))
        assert v.shape == (3, 24, cfg.patch_latent_dim) and v.dtype == torch.float32
        assert model.tokens_to_image(v, hw).shape == (3, 3, 16, 24)


def test_bad_inputs_name_the_problem():
    model = tiny_model()
    with pytest.raises(ValueError, match="vocab"):
        model.text_segment([1, 999])
    with pytest.raises(ValueError, match="multiple of 4"):
        model.latent_grid(18, 16)
    with pytest.raises(ValueError, match="max_latent_size"):
        model.latent_segment(torch.zeros(17 * 17, model.cfg.patch_latent_dim), t=0.0, hw=(17, 17))
    cache = encode_context(model, [[Text(ids=(5,))]])
    with pytest.raises(ValueError, match="cache holds 1 rows"):
        model.velocity(torch.zeros(2, 4, model.cfg.patch_latent_dim), torch.zeros(2), hw=(2, 2), cache=cache)
