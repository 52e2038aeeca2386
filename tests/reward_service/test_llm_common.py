"""What the LLM backends share, without an engine: batched retry rounds, options, schema, scoring,
the OpenAI client against a local stdlib HTTP server, and import hygiene."""
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from reward_service.backends import BackendError, BackendSpec, DecomposeRequest, build_decomposer
from reward_service.backends.llm_common import decompose_batched, flatten, question_list_schema, regroup, score
from reward_service.backends.llm_options import decomposer_version, options
from reward_service.parse import DecompositionError, parse_decomposition
from reward_service.schema import DecomposerVersion, prompt_key
from tests.reward_service.llm_helpers import question_set

ROOT = Path(__file__).resolve().parents[2]
V = DecomposerVersion(name="vllm:m", template_version="dsg-json-v1")
GOOD = '[{"id": "q1", "question": "Is there a cat?", "kind": "semantic", "category": "existence", "parents": []}]'


def test_each_retry_round_is_one_batched_call():
    calls = []

    def generate_many(requests):              # prompt "a": good at once; "b": good on its retry; "c": never
        calls.append(requests)
        return [GOOD if ("a" in r.split("Prompt: ")[-1][:2] or "previous reply" in r) and "Prompt: c" not in r
                else "no idea" for r in requests]

    with pytest.raises(DecompositionError, match="prompt 'c' failed: no usable reply in 3 attempts"):
        decompose_batched(generate_many, ["a", "b", "c"], budget=3, version=V)
    assert [len(c) for c in calls] == [3, 2, 1]          # round 1: all; round 2: b, c; round 3: c
    calls.clear()
    sets = decompose_batched(generate_many, ["a", "b"], budget=3, version=V)
    assert [len(c) for c in calls] == [2, 1] and [s.prompt for s in sets] == ["a", "b"]
    assert sets[0].prompt_hash == prompt_key("a") and sets[0].version == V


def test_batched_equals_one_prompt_at_a_time():
    replies = {"x": ["```json\n" + GOOD[:-1] + ",]\n```"], "y": ["nope", GOOD]}
    seen = {"x": 0, "y": 0}

    def one(prompt):
        def generate(_request):
            seen[prompt] += 1
            return replies[prompt][seen[prompt] - 1]
        return generate

    from reward_service.parse import decompose_with_retries
    single = [decompose_with_retries(one(p), p, budget=2, version=V) for p in ("x", "y")]
    seen.update(x=0, y=0)
    batched = decompose_batched(lambda reqs: [one("x" if "Prompt: x" in r else "y")(r) for r in reqs], ["x", "y"],
                                budget=2, version=V)
    assert batched == single and "removed trailing commas" in batched[0].notes


def test_the_schema_accepts_what_the_parser_reads():
    schema = question_list_schema()
    assert schema["type"] == "array" and schema["maxItems"] == 64
    item = schema["items"]
    assert set(item["required"]) == {"id", "question", "kind", "category", "parents"}
    qs = parse_decomposition(GOOD, prompt="p", version=V)
    assert qs.notes == () and qs.questions[0].category in item["properties"]["category"]["enum"]


@pytest.mark.parametrize("top, text, want", [
    ([("yes", -0.1), ("No", -2.3), (" no", -3.0), ("cat", -0.5)], "", None),
    ([("cat", -0.1)], "Yes, it is.", 1.0),
    ([("cat", -0.1)], "maybe", 0.0),
    ([("ĠYes", 0.0)], "", 1.0),
])
def test_score(top, text, want):
    import math
    expected = want if want is not None else math.exp(-0.1) / (math.exp(-0.1) + math.exp(-2.3) + math.exp(-3.0))
    assert score(top, text) == pytest.approx(expected)


def test_flatten_and_regroup_keep_each_images_questions_together():
    items = [("img0", question_set(["a", "b"])), ("img1", question_set(["c"])), ("img2", question_set(["d", "e", "f"]))]
    assert flatten(items) == [(0, "a"), (0, "b"), (1, "c"), (2, "d"), (2, "e"), (2, "f")]
    assert regroup([1, 2, 3, 4, 5, 6], items) == [[1.0, 2.0], [3.0], [4.0, 5.0, 6.0]]
    with pytest.raises(RuntimeError):
        regroup([1, 2], items)


@pytest.mark.parametrize("name, role, opts, match", [
    ("vllm", "decomposer", {"model": "m", "temperature": 5.0}, "option temperature=5.0: must be in"),
    ("vllm", "verifier", {"model": "m", "top_logprobs": 0}, "option top_logprobs=0"),
    ("vllm", "verifier", {"model": "m", "enforce_eager": "yes"}, "option enforce_eager='yes' must be"),
    ("hf", "decomposer", {"model": "m", "dtype": "fp8"}, "option dtype='fp8': not one of"),
    ("openai", "decomposer", {"model": "m", "base_url": "ftp://x"}, "option base_url='ftp://x'"),
    ("openai", "verifier", {"model": "m", "base_url": "http://x", "api_key_env": "sk-123"},
     r"option api_key_env: must name an environment variable .*not hold the key \(6 characters given\)"),
    ("openai", "verifier", {"model": "m", "base_url": "http://x", "api_key": "sk-123"},
     r"unknown option\(s\) \['api_key'\]; known: .*pass a key through the environment"),
    ("openai", "verifier", {"base_url": "http://x"}, r"option\(s\) \['model'\] required"),
])
def test_options_are_checked_by_name(name, role, opts, match):
    with pytest.raises(BackendError, match=f"{role} backend '{name}': {match}"):
        options(BackendSpec(name=name, options=opts), role=role)


def test_versions_come_from_options_without_loading_anything():
    spec = BackendSpec(name="vllm", options={"model": "Qwen/Qwen2.5-7B-Instruct"})
    assert str(decomposer_version(spec)) == "vllm:Qwen/Qwen2.5-7B-Instruct@dsg-json-v1"
    spec = BackendSpec(name="hf", options={"model": "/models/a@b", "model_name": "qwen-7b"})
    assert str(decomposer_version(spec)) == "hf:qwen-7b@dsg-json-v1"
    with pytest.raises(BackendError, match="set the option model_name"):
        decomposer_version(BackendSpec(name="hf", options={"model": "/models/a@b"}))


class _EchoHandler(BaseHTTPRequestHandler):
    """401 with the Authorization header echoed back (as careless servers do); else a chat reply."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.headers.get("Authorization") != "Bearer right-key":
            self._send(401, {"error": f"bad key {self.headers.get('Authorization')}"})
        elif body["model"] == "verifier":
            top = [{"token": "Yes", "logprob": -0.2}, {"token": " no", "logprob": -1.9}]
            self._send(200, {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [
                {"token": "Yes", "logprob": -0.2, "top_logprobs": top}]}}]})
        else:
            self._send(200, {"choices": [{"message": {"content": json.dumps({"questions": json.loads(GOOD)})}}]})

    def _send(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_server():
    server = HTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_openai_client_scrubs_an_echoed_key(echo_server, monkeypatch):
    from reward_service.backends.openai_backend import EndpointError
    monkeypatch.setenv("ECHO_KEY", "sk-secret-0123456789")
    d = build_decomposer(BackendSpec(name="openai", options={"base_url": echo_server, "model": "decomposer",
                                                             "api_key_env": "ECHO_KEY", "max_retries": 0}))
    with pytest.raises(EndpointError) as err:
        d.decompose_batch([DecomposeRequest(prompt="a cat")])
    assert "HTTP 401" in str(err.value) and "Bearer ***" in str(err.value)
    assert "sk-secret-0123456789" not in str(err.value) + repr(d) + repr(d.client)
    monkeypatch.setenv("ECHO_KEY", "right-key")
    d = build_decomposer(BackendSpec(name="openai", options={"base_url": echo_server, "model": "decomposer",
                                                             "api_key_env": "ECHO_KEY"}))
    (qs,) = d.decompose_batch([DecomposeRequest(prompt="a cat")])
    assert qs.questions[0].text == "Is there a cat?" and "unwrapped the question list from an object" in qs.notes
    from reward_service.backends import build_verifier
    import numpy as np
    v = build_verifier(BackendSpec(name="openai", options={"base_url": echo_server, "model": "verifier",
                                                           "api_key_env": "ECHO_KEY"}))
    (scores,) = v.answer_batch([(np.zeros((8, 8, 3), np.uint8), question_set(["a", "b", "c"]))])
    import math
    assert scores == pytest.approx([math.exp(-0.2) / (math.exp(-0.2) + math.exp(-1.9))] * 3)


def test_package_import_and_shapes_backends_load_no_llm_stack():
    code = ("import sys; from reward_service.backends import BackendSpec, build_decomposer, build_verifier; "
            "import reward_service.decompose, reward_service.backends.llm_common, reward_service.backends.llm_options; "
            "build_decomposer(BackendSpec(name='shapes')); build_verifier(BackendSpec(name='shapes')); "
            "print(sorted(m for m in ('vllm', 'transformers', 'openai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
