"""OpenAI-compatible backends: any /v1/chat/completions endpoint (OpenAI, vLLM's server, ...) over HTTP.

Plain stdlib HTTP (urllib), requests sent `concurrency` at a time from a thread pool.
The API key is read from the environment variable named by `api_key_env` (default OPENAI_API_KEY;
unset = no Authorization header, as local servers need none). It lives only in the client's
private header dict: it is never logged, never in a repr, and scrubbed from every error message
(servers may echo parts of a bad key back in their error body).

Decomposer: one request per prompt per round of `llm_common.decompose_batched`; with `guided`,
`response_format` is a JSON schema (the question list wrapped as {"questions": [...]}, since
OpenAI requires an object at the top; the parser unwraps it and notes that it did).
Verifier: one request per question (the chat API takes one conversation per request), all
questions of a batch in flight together, each image's questions sent adjacently so a server with
prefix caching (vLLM) shares the image prefix. Score from `logprobs` / `top_logprobs` of the first
generated token, P(yes) / (P(yes) + P(no)); the message text when neither word is in the top k.
"""
from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from reward_service.backends import BackendSpec, DecomposeRequest
from reward_service.backends.llm_common import (as_pil, decompose_batched, flatten, question_list_schema, regroup,
                                                request_key, score, verifier_messages)
from reward_service.backends.llm_options import (EndpointOptions, OpenAIDecomposerOptions, OpenAIVerifierOptions,
                                                 llm_version, options)
from reward_service.schema import QuestionSet

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """An endpoint that failed or answered something unreadable; names the URL and model, never the key."""


class ChatClient:
    """POST /chat/completions with retries; the key is kept out of every string this class makes."""

    def __init__(self, opts: EndpointOptions, *, role: str) -> None:
        self.url = opts.base_url.rstrip("/") + "/chat/completions"
        self.opts = opts
        self.where = f"openai {role} ({self.url}, model {opts.model!r})"
        key = os.environ.get(opts.api_key_env, "")
        self._secret = key
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    def __repr__(self) -> str:
        return f"ChatClient({self.url}, model={self.opts.model!r}, key from ${self.opts.api_key_env})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._secret, "***") if self._secret else text

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps({"model": self.opts.model, **body, **(self.opts.extra_body or {})}).encode()
        for attempt in range(self.opts.max_retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=self._headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.opts.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode(errors="replace")
                status, retry = e.code, e.code in RETRY_STATUS
                problem = f"HTTP {status}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                retry, problem = True, f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                retry, problem = False, f"the reply is not JSON ({e})"
            if not retry or attempt == self.opts.max_retries:
                raise EndpointError(self._scrub(f"{self.where}: {problem} (after {attempt + 1} tries)")) from None
            time.sleep(min(8.0, 0.5 * 2 ** attempt))
        raise AssertionError("unreachable")

    def chat_many(self, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The replies to `bodies`, in order, `concurrency` requests at a time."""
        if len(bodies) <= 1:
            return [self.chat(b) for b in bodies]
        with ThreadPoolExecutor(max_workers=min(self.opts.concurrency, len(bodies))) as pool:
            return list(pool.map(self.chat, bodies))

    def first_choice(self, reply: dict[str, Any]) -> dict[str, Any]:
        try:
            return reply["choices"][0]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(self._scrub(f"{self.where}: a reply without choices: {str(reply)[:300]}")) from None


class OpenAIDecomposer:
    """Prompts -> question sets with a chat model behind an OpenAI-compatible endpoint."""

    def __init__(self, opts: OpenAIDecomposerOptions) -> None:
        self.opts = opts
        self.version = llm_version("openai", model=opts.model, model_name=opts.model_name)
        self.client = ChatClient(opts, role="decomposer")
        self.body: dict[str, Any] = {"max_tokens": opts.max_tokens, "temperature": opts.temperature}
        if opts.guided:
            wrapped = {"type": "object", "properties": {"questions": question_list_schema()},
                       "required": ["questions"], "additionalProperties": False}
            self.body["response_format"] = {"type": "json_schema",
                                            "json_schema": {"name": "questions", "schema": wrapped}}

    def __repr__(self) -> str:
        return f"OpenAIDecomposer({self.version}, {self.client!r})"

    def key(self, request: DecomposeRequest) -> str:
        return request_key(request)

    def generate_many(self, requests: list[str]) -> list[str]:
        replies = self.client.chat_many([{**self.body, "messages": [{"role": "user", "content": r}]}
                                         for r in requests])
        return [self.client.first_choice(r).get("message", {}).get("content") or "" for r in replies]

    def decompose_batch(self, requests: list[DecomposeRequest]) -> list[QuestionSet]:
        return decompose_batched(self.generate_many, [r.prompt for r in requests], budget=self.opts.budget,
                                 version=self.version)


def data_url(image: Any) -> str:
    """A PNG data URL of the image (lossless: the verifier sees the pixels the policy made)."""
    buffer = io.BytesIO()
    as_pil(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class OpenAIVerifier:
    """(image, question set) -> P(yes) per question from an OpenAI-compatible chat endpoint."""

    def __init__(self, opts: OpenAIVerifierOptions) -> None:
        self.opts = opts
        self.name = f"openai:{opts.model_name or opts.model}"
        self.client = ChatClient(opts, role="verifier")

    def __repr__(self) -> str:
        return f"OpenAIVerifier({self.name}, {self.client!r})"

    def _score(self, reply: dict[str, Any]) -> float:
        choice = self.client.first_choice(reply)
        content = (choice.get("logprobs") or {}).get("content") or []
        top = content[0].get("top_logprobs") or [] if content else []
        return score(((t.get("token", ""), t.get("logprob")) for t in top),
                     (choice.get("message") or {}).get("content") or "")

    def answer_batch(self, items: list[tuple[Any, QuestionSet]]) -> list[list[float]]:
        urls = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image, _ in items]
        bodies = [{"messages": verifier_messages(urls[i], text), "max_tokens": self.opts.answer_tokens,
                   "temperature": 0.0, "logprobs": True, "top_logprobs": self.opts.top_logprobs}
                  for i, text in flatten(items)]
        return regroup([self._score(r) for r in self.client.chat_many(bodies)], items)

    def answer(self, image: Any, qs: QuestionSet) -> list[float]:
        return self.answer_batch([(image, qs)])[0]


def build_decomposer(spec: BackendSpec) -> OpenAIDecomposer:
    return OpenAIDecomposer(options(spec, role="decomposer"))


def build_verifier(spec: BackendSpec) -> OpenAIVerifier:
    return OpenAIVerifier(options(spec, role="verifier"))
