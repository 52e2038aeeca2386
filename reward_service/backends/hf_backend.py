"""transformers backends: `generate` for decomposition, one forward for verification.

Decomposer: AutoModelForCausalLM + the tokenizer's chat template; each round of
`llm_common.decompose_batched` is one left-padded `generate` call (in chunks of `batch_size`).
transformers has no constrained decoding here, so the parser's repairs and retries do the work.

Verifier: AutoModelForImageTextToText + AutoProcessor. The questions of one image are one
right-padded forward (right padding keeps every real token's position, so the scores equal
unpadded forwards); the score is read at each row's last real token: P(yes) / (P(yes) + P(no))
over that token's top-k log-probs, the same rule as the vllm and openai backends; when neither
word is in the top k, a short greedy `generate` gives the text fallback. The image prefix is
recomputed per question (use the vllm backend for throughput).

Weights load from safetensors only; trust_remote_code is never enabled.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from reward_service.aggregate import yes_from_text, yes_probability
from reward_service.backends import BackendSpec, DecomposeRequest
from reward_service.backends.llm_common import as_pil, decompose_batched, regroup, request_key, verifier_messages
from reward_service.backends.llm_options import (HFDecomposerOptions, HFModelOptions, HFVerifierOptions,
                                                 llm_version, options)
from reward_service.schema import QuestionSet

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(cls, opts: HFModelOptions):
    try:
        model = cls.from_pretrained(opts.model, dtype=DTYPES[opts.dtype], use_safetensors=True,
                                    trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise OSError(f"hf backend: cannot load model {opts.model!r} as {cls.__name__}: {e}") from e
    return model.to(opts.device).eval()


class HFDecomposer:
    """Prompts -> question sets with transformers `generate`."""

    def __init__(self, opts: HFDecomposerOptions) -> None:
        self.opts = opts
        self.version = llm_version("hf", model=opts.model, model_name=opts.model_name)
        self.tokenizer = AutoTokenizer.from_pretrained(opts.model, trust_remote_code=False)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = _load(AutoModelForCausalLM, opts)

    def __repr__(self) -> str:
        return f"HFDecomposer({self.version}, device={self.opts.device})"

    def key(self, request: DecomposeRequest) -> str:
        return request_key(request)

    @torch.no_grad()
    def generate_many(self, requests: list[str]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(requests), self.opts.batch_size):
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                                        add_generation_prompt=True,
                                                        **(self.opts.chat_template_kwargs or {}))
                     for r in requests[i:i + self.opts.batch_size]]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(self.opts.device)
            sample = self.opts.temperature > 0
            ids = self.model.generate(**batch, max_new_tokens=self.opts.max_tokens, do_sample=sample,
                                      temperature=self.opts.temperature if sample else None, top_p=None, top_k=None,
                                      pad_token_id=self.tokenizer.pad_token_id)
            out += self.tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return out

    def decompose_batch(self, requests: list[DecomposeRequest]) -> list[QuestionSet]:
        return decompose_batched(self.generate_many, [r.prompt for r in requests], budget=self.opts.budget,
                                 version=self.version)


class HFVerifier:
    """(image, question set) -> P(yes) per question with one transformers forward per image."""

    def __init__(self, opts: HFVerifierOptions) -> None:
        self.opts = opts
        self.name = f"hf:{opts.model_name or opts.model}"
        self.processor = AutoProcessor.from_pretrained(opts.model, trust_remote_code=False)
        self.processor.tokenizer.padding_side = "right"
        self.model = _load(AutoModelForImageTextToText, opts)

    def __repr__(self) -> str:
        return f"HFVerifier({self.name}, device={self.opts.device})"

    def _texts(self, questions: list[str]) -> list[str]:
        return [self.processor.apply_chat_template(verifier_messages({"type": "image"}, q), tokenize=False,
                                                   add_generation_prompt=True,
                                                   **(self.opts.chat_template_kwargs or {}))
                for q in questions]

    @torch.no_grad()
    def _scores(self, image, questions: list[str]) -> list[float]:
        texts = self._texts(questions)
        batch = self.processor(text=texts, images=[[image]] * len(texts), padding=True, return_tensors="pt",
                               add_special_tokens=False).to(self.opts.device)
        logits = self.model(**batch).logits.float()
        last = batch["attention_mask"].sum(dim=1) - 1
        logp = torch.log_softmax(logits[torch.arange(len(texts)), last], dim=-1)
        top = torch.topk(logp, k=min(self.opts.top_logprobs, logp.shape[-1]), dim=-1)
        out = []
        for row, (values, ids) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            p = yes_probability([(self.processor.tokenizer.decode([i]), v) for i, v in zip(ids, values)])
            out.append(p if p is not None else yes_from_text(self._generate(texts[row], image)))
        return out

    def _generate(self, text: str, image) -> str:
        batch = self.processor(text=[text], images=[[image]], return_tensors="pt",
                               add_special_tokens=False).to(self.opts.device)
        ids = self.model.generate(**batch, max_new_tokens=self.opts.answer_tokens, do_sample=False)
        return self.processor.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def answer_batch(self, items: list[tuple[Any, QuestionSet]]) -> list[list[float]]:
        scores: list[float] = []
        for image, qs in items:
            pil = as_pil(image)
            texts = [q.text for q in qs.questions]
            for i in range(0, len(texts), self.opts.batch_size):
                scores += self._scores(pil, texts[i:i + self.opts.batch_size])
        return regroup(scores, items)

    def answer(self, image: Any, qs: QuestionSet) -> list[float]:
        return self.answer_batch([(image, qs)])[0]


def build_decomposer(spec: BackendSpec) -> HFDecomposer:
    return HFDecomposer(options(spec, role="decomposer"))


def build_verifier(spec: BackendSpec) -> HFVerifier:
    return HFVerifier(options(spec, role="verifier"))
