"""transformers backends on tiny random models built in the test (no downloads).

Verifier: the questions of one image go through one right-padded forward; its scores equal one
unpadded forward per question (llm_helpers.reference_scores, every yes/no token summed) within 1e-4
when k covers the vocabulary; with k = 1 they fall back to the greedy text.
Decomposer: a random model's real `generate` output is garbage, so the retry budget runs out and
the error names the prompt; a canned reply (substituted after the real generate ran) parses.
"""
import copy

import pytest

from bench.tiny_models import build_idefics3, build_qwen2
from reward_service.backends import BackendError, BackendSpec, DecomposeRequest, build_decomposer, build_verifier
from reward_service.parse import DecompositionError
from reward_service.schema import prompt_key
from tests.reward_service.llm_helpers import QUESTIONS, image, question_set, reference_scores

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return build_idefics3(tmp_path_factory.mktemp("idefics3"))


@pytest.fixture(scope="module")
def decomposer(tmp_path_factory):
    model = build_qwen2(tmp_path_factory.mktemp("qwen2"))
    return build_decomposer(BackendSpec(name="hf", options={"model": str(model), "max_tokens": 24, "budget": 2}))


def test_verifier_batch_equals_unpadded_forwards(vlm):
    verifier = build_verifier(BackendSpec(name="hf", options={"model": str(vlm), "top_logprobs": 600, "batch_size": 3}))
    img_a, img_b = image(0), image(1)
    got = verifier.answer_batch([(img_a, question_set(QUESTIONS)), (img_b, question_set(QUESTIONS[1:]))])
    want_a, want_b = reference_scores(vlm, img_a, QUESTIONS), reference_scores(vlm, img_b, QUESTIONS[1:])
    assert got[0] == pytest.approx(want_a, abs=1e-4) and got[1] == pytest.approx(want_b, abs=1e-4)
    assert max(want_a) - min(want_a) > 0.02, want_a
    assert str(vlm) in repr(verifier) and verifier.name == f"hf:{vlm}"


def test_verifier_text_fallback(vlm):
    verifier = build_verifier(BackendSpec(name="hf", options={"model": str(vlm), "top_logprobs": 1}))
    (scores,) = verifier.answer_batch([(image(2), question_set(QUESTIONS))])
    assert set(scores) <= {0.0, 1.0}                        # top-1 yes/no, or the generated text's answer


def test_decomposer_real_generate_then_budget_error_names_the_prompt(decomposer):
    replies, real = [], decomposer.generate_many
    spy = copy.copy(decomposer)
    spy.generate_many = lambda requests: replies.extend(out := real(requests)) or out
    with pytest.raises(DecompositionError, match=r"decomposition of prompt 'two red apples' failed: "
                                                 r"no usable reply in 2 attempts"):
        spy.decompose_batch([DecomposeRequest(prompt="two red apples")])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_decomposer_canned_reply_after_real_generate(decomposer):
    real = decomposer.generate_many
    canned = copy.copy(decomposer)
    canned.generate_many = lambda requests: [real(requests) and '[{"question": "Is there an apple?"}]'] * len(requests)
    (qs,) = canned.decompose_batch([DecomposeRequest(prompt="two red apples")])
    assert qs.prompt_hash == prompt_key("two red apples") and str(qs.version).startswith("hf:")
    assert [(q.id, q.kind, q.category) for q in qs.questions] == [("q1", "semantic", "attribute")]


def test_guided_is_refused_by_name():
    with pytest.raises(BackendError, match="decomposer backend 'hf': option guided=True: not available"):
        build_decomposer(BackendSpec(name="hf", options={"model": "m", "guided": True}))
