"""Decomposer and verifier backends, built by name from a `BackendSpec`.

Each backend module imports only what its own backend needs (vLLM, transformers, an HTTP client),
and is imported only when that backend is built, so `shapes` never pulls in an LLM stack.
  shapes   shapes_decomposer / shapes_verifier: exact, from the shapes world (no options)
  vllm     vllm_backend: vllm.LLM in this process (chat LLM / chat MLLM)
  hf       hf_backend: transformers generate / forward
  openai   openai_backend: any OpenAI-compatible /v1/chat/completions endpoint over HTTP
Options of the LLM backends: the dataclasses in those modules (docs/dvreward.md lists them); an
unknown or bad option is a BackendError naming it.

Interfaces every backend implements (the reward actors call only these):
  decomposer  .version: DecomposerVersion
              .decompose_batch(requests: list[DecomposeRequest]) -> list[QuestionSet]
              .key(request) -> str   (LLM backends: the prompt half of the cache key, prompt_key(text))
  verifier    .name: str
              .answer_batch(items: list[tuple[image, QuestionSet]]) -> list[list[float]]
                (one yes-probability per question, in the set's order, for each item)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from reward_service.schema import DecomposerVersion, QuestionSet


@dataclass(frozen=True, kw_only=True)
class DecomposeRequest:
    """One prompt to decompose. `meaning`: the shapes world's structured meaning (shapes backend
    only; LLM backends read the text)."""
    prompt: str
    meaning: Any = None


@dataclass(frozen=True, kw_only=True)
class BackendSpec:
    """A backend by name plus its options (model path, sampling, endpoint, ...)."""
    name: str
    options: dict[str, Any] = field(default_factory=dict)


class Decomposer(Protocol):
    version: DecomposerVersion

    def decompose_batch(self, requests: list[DecomposeRequest]) -> list[QuestionSet]: ...


class BatchVerifier(Protocol):
    name: str

    def answer_batch(self, items: list[tuple[Any, QuestionSet]]) -> list[list[float]]: ...


class BackendError(ValueError):
    """An unknown backend or bad backend options; the message names the backend and the option."""


def _no_options(spec: BackendSpec) -> None:
    if spec.options:
        raise BackendError(f"backend {spec.name!r} takes no options, got {sorted(spec.options)}")


def build_decomposer(spec: BackendSpec) -> Decomposer:
    if spec.name == "shapes":
        from reward_service.backends.shapes_decomposer import ShapesDecomposer
        _no_options(spec)
        return ShapesDecomposer()
    if spec.name == "vllm":
        from reward_service.backends import vllm_backend
        return vllm_backend.build_decomposer(spec)
    if spec.name == "hf":
        from reward_service.backends import hf_backend
        return hf_backend.build_decomposer(spec)
    if spec.name == "openai":
        from reward_service.backends import openai_backend
        return openai_backend.build_decomposer(spec)
    raise BackendError(f"decomposer backend {spec.name!r}: not one of {DECOMPOSERS}")


def build_verifier(spec: BackendSpec) -> BatchVerifier:
    if spec.name == "shapes":
        from reward_service.backends.shapes_verifier import ShapesVerifier
        _no_options(spec)
        return ShapesVerifier()
    if spec.name == "vllm":
        from reward_service.backends import vllm_backend
        return vllm_backend.build_verifier(spec)
    if spec.name == "hf":
        from reward_service.backends import hf_backend
        return hf_backend.build_verifier(spec)
    if spec.name == "openai":
        from reward_service.backends import openai_backend
        return openai_backend.build_verifier(spec)
    raise BackendError(f"verifier backend {spec.name!r}: not one of {VERIFIERS}")


DECOMPOSERS: tuple[str, ...] = ("shapes", "vllm", "hf", "openai")
VERIFIERS: tuple[str, ...] = ("shapes", "vllm", "hf", "openai")
