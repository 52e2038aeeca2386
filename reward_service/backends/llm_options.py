"""Options of the LLM/MLLM backends (vllm, hf, openai): one dataclass per backend and role.

Kept apart from the backend modules (which import vLLM / transformers) so options can be
validated, and a decomposer's cache version computed, without loading an engine: the offline
`decompose` command looks the whole input up in the cache before it builds anything.
`options(spec, role=...)` builds the dataclass from `BackendSpec.options`; an unknown key, a
missing required key, a wrong type or a bad value is a BackendError naming the backend, the role
and the option.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from reward_service.backends import BackendError, BackendSpec
from reward_service.schema import DecomposerVersion
from reward_service.templates import TEMPLATE_VERSION


# ---- what every backend of a role shares -------------------------------------------------------------

@dataclasses.dataclass(kw_only=True)
class DecodeOptions:
    """How a decomposer samples and how many replies it may try per prompt."""
    budget: int = 3                 # replies per prompt (first + retries) before DecompositionError
    max_tokens: int = 1024          # tokens per reply (a cut-off list keeps its complete items)
    temperature: float = 0.0        # 0 = greedy
    guided: bool = True             # constrain replies to the question-list JSON schema (vllm, openai)

    def check(self) -> None:
        if self.budget < 1:
            raise ValueError(f"budget={self.budget!r}: must be >= 1")
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be >= 16")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature!r}: must be in [0, 2]")


@dataclasses.dataclass(kw_only=True)
class AnswerOptions:
    """How a verifier reads one answer."""
    top_logprobs: int = 20          # k of the first token's top-k log-probs (OpenAI allows <= 20)
    answer_tokens: int = 3          # tokens generated for the text fallback

    def check(self) -> None:
        if self.top_logprobs < 1:
            raise ValueError(f"top_logprobs={self.top_logprobs!r}: must be >= 1")
        if self.answer_tokens < 1:
            raise ValueError(f"answer_tokens={self.answer_tokens!r}: must be >= 1")


# ---- vllm -----------------------------------------------------------------------------------------------

@dataclasses.dataclass(kw_only=True)
class VLLMEngineOptions:
    """The vllm.LLM engine in this process; None leaves vLLM's default."""
    model: str                                   # Hugging Face id or local directory (safetensors)
    model_name: str = ""                         # name in the decomposer version (default: model)
    dtype: str = "auto"                          # "auto", "float32", "bfloat16", "float16"
    max_model_len: int = 4096                    # tokens per sequence (prompt + reply)
    seed: int = 0
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # GPU: fraction of memory for weights + KV cache
    kv_cache_memory_bytes: int | None = None     # KV cache size in bytes (CPU: e.g. 64 << 20)
    block_size: int | None = None                # KV block in tokens (CPU: a multiple of 32)
    enforce_eager: bool | None = None            # CPU: True (else ~1 min of torch.compile warm-up)
    enable_prefix_caching: bool | None = None    # vLLM's default is on; the verifier relies on it
    chat_template_kwargs: dict | None = None     # e.g. {"enable_thinking": False} for Qwen3
    engine_args: dict | None = None              # any other vllm.LLM keyword arguments

    def check(self) -> None:
        if not self.model:
            raise ValueError("model='': name a model id or directory")
        if self.engine_args and "trust_remote_code" in self.engine_args:
            raise ValueError("engine_args.trust_remote_code: remote code is never run")


@dataclasses.dataclass(kw_only=True)
class VLLMDecomposerOptions(VLLMEngineOptions, DecodeOptions):
    pass


@dataclasses.dataclass(kw_only=True)
class VLLMVerifierOptions(VLLMEngineOptions, AnswerOptions):
    pass


# ---- hf -------------------------------------------------------------------------------------------------

HF_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass(kw_only=True)
class HFModelOptions:
    """Which transformers model, where, in what precision."""
    model: str                           # Hugging Face id or local directory (safetensors)
    model_name: str = ""                 # name in the decomposer version (default: model)
    dtype: str = "float32"               # one of HF_DTYPES
    device: str = "cpu"                  # "cpu", "cuda", "cuda:1", ...
    batch_size: int = 16                 # sequences per generate / forward call
    chat_template_kwargs: dict | None = None

    def check(self) -> None:
        if not self.model:
            raise ValueError("model='': name a model id or directory")
        if self.dtype not in HF_DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: not one of {HF_DTYPES}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r}: must be >= 1")


@dataclasses.dataclass(kw_only=True)
class HFDecomposerOptions(HFModelOptions, DecodeOptions):
    guided: bool = False                 # transformers has no constrained decoding here

    def check(self) -> None:
        if self.guided:
            raise ValueError("guided=True: not available with transformers (use the vllm backend)")


@dataclasses.dataclass(kw_only=True)
class HFVerifierOptions(HFModelOptions, AnswerOptions):
    pass


# ---- openai ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(kw_only=True)
class EndpointOptions:
    """Which OpenAI-compatible endpoint, and how patiently to talk to it."""
    base_url: str                          # e.g. "https://api.openai.com/v1", "http://127.0.0.1:8000/v1"
    model: str                             # the endpoint's model name
    model_name: str = ""                   # name in the decomposer version (default: model)
    api_key_env: str = "OPENAI_API_KEY"    # environment variable holding the key (the key itself never)
    timeout_s: float = 120.0               # per HTTP request
    max_retries: int = 3                   # extra tries on connection errors, 408/409/429/5xx (backoff)
    concurrency: int = 8                   # requests in flight
    extra_body: dict | None = None         # merged into every request body (e.g. {"seed": 0})

    def check(self) -> None:
        if not re.match(r"https?://", self.base_url):
            raise ValueError(f"base_url={self.base_url!r}: must start with http:// or https://")
        if not self.model:
            raise ValueError("model='': name the endpoint's model")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):     # its value is not echoed: it
            raise ValueError("api_key_env: must name an environment variable (e.g. OPENAI_API_KEY), "
                             f"not hold the key ({len(self.api_key_env)} characters given)")  # may be the key
        if self.timeout_s <= 0 or self.max_retries < 0 or self.concurrency < 1:
            raise ValueError("timeout_s > 0, max_retries >= 0 and concurrency >= 1 are required")


@dataclasses.dataclass(kw_only=True)
class OpenAIDecomposerOptions(EndpointOptions, DecodeOptions):
    pass


@dataclasses.dataclass(kw_only=True)
class OpenAIVerifierOptions(EndpointOptions, AnswerOptions):
    pass


# ---- building and checking ------------------------------------------------------------------------------

OPTIONS: dict[tuple[str, str], type] = {
    ("vllm", "decomposer"): VLLMDecomposerOptions, ("vllm", "verifier"): VLLMVerifierOptions,
    ("hf", "decomposer"): HFDecomposerOptions, ("hf", "verifier"): HFVerifierOptions,
    ("openai", "decomposer"): OpenAIDecomposerOptions, ("openai", "verifier"): OpenAIVerifierOptions,
}
_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,)}


def options(spec: BackendSpec, *, role: str) -> Any:
    """The validated options dataclass of `spec` for `role` ("decomposer" | "verifier")."""
    where = f"{role} backend {spec.name!r}"
    cls = OPTIONS.get((spec.name, role))
    if cls is None:
        raise BackendError(f"{where}: not an LLM backend (one of {sorted({n for n, _ in OPTIONS})})")
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    unknown = sorted(set(spec.options) - set(known))
    if unknown:
        hint = "; pass a key through the environment (api_key_env)" if any("key" in k for k in unknown) else ""
        raise BackendError(f"{where}: unknown option(s) {unknown}; known: {known}{hint}")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in spec.options]
    if missing:
        raise BackendError(f"{where}: option(s) {missing} required")
    for f in fields:
        if f.name in spec.options:
            _check_type(where, f, spec.options[f.name])
    opts = cls(**spec.options)
    for base in reversed(cls.__mro__):              # every class's own check, bases first
        check = base.__dict__.get("check")
        if check is not None:
            try:
                check(opts)
            except ValueError as e:
                raise BackendError(f"{where}: option {e}") from None
    return opts


def _check_type(where: str, f: dataclasses.Field, value: Any) -> None:
    """Check a value against its field's simple annotation (`int`, `str | None`, `dict | None`)."""
    names = [part.strip().split("[")[0] for part in str(f.type).split("|")]
    if value is None and "None" in names:
        return
    allowed = tuple(t for n in names for t in _TYPES.get(n, ()))
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise BackendError(f"{where}: option {f.name}={value!r} must be {f.type}")


def llm_version(backend: str, *, model: str, model_name: str = "") -> DecomposerVersion:
    """DecomposerVersion(name=f"{backend}:{model_name or model}", template_version=TEMPLATE_VERSION)."""
    name = f"{backend}:{(model_name or model).rstrip('/')}"
    try:
        return DecomposerVersion(name=name, template_version=TEMPLATE_VERSION)
    except ValueError:
        raise BackendError(f"decomposer backend {backend!r}: model {model!r} cannot name a cache version "
                           "(it contains '@'); set the option model_name") from None


def decomposer_version(spec: BackendSpec) -> DecomposerVersion:
    """The cache version an LLM decomposer built from `spec` will have (options validated, nothing loaded)."""
    opts = options(spec, role="decomposer")
    return llm_version(spec.name, model=opts.model, model_name=opts.model_name)
