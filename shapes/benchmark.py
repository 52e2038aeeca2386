"""`shapes-geneval`: the held-out benchmark of the embedded world.

Fixed prompts per category (GenEval's six, implicit intent, edits), drawn once from a dedicated
seed. Their exact texts never appear in pretraining or RL training: every training sampler asks
`is_held_out(text)` and redraws (tests/shapes check the samplers). Scoring is GenEval-style strict
correctness by the programmatic judge, per category.
"""
from __future__ import annotations

import random
from functools import lru_cache

from shapes.prompts import FAMILIES, Prompt, generate
from shapes.tokenizer import normalise
from shapes.world import DEFAULT_CANVAS_SIZE

BENCHMARK_SEED = 20260512
PROMPTS_PER_CATEGORY = 24
CATEGORIES: tuple[str, ...] = FAMILIES          # six GenEval families + implicit colour/count + edit


@lru_cache(maxsize=4)
def benchmark_prompts(*, canvas_size: int = DEFAULT_CANVAS_SIZE,
                      per_category: int = PROMPTS_PER_CATEGORY) -> tuple[Prompt, ...]:
    """The benchmark, deterministic: `per_category` distinct prompt texts for each category."""
    out: list[Prompt] = []
    for c_idx, category in enumerate(CATEGORIES):
        rng = random.Random(BENCHMARK_SEED * 100 + c_idx)
        seen: set[str] = set()
        tries = 0
        while len([p for p in out if p.family == category]) < per_category:
            tries += 1
            if tries > 200 * per_category:
                raise RuntimeError(f"benchmark: cannot find {per_category} distinct {category} prompts")
            p = generate(category, rng, canvas_size=canvas_size)
            if normalise(p.text) not in seen:
                seen.add(normalise(p.text))
                out.append(p)
    return tuple(out)


@lru_cache(maxsize=4)
def _held_out_texts(canvas_size: int) -> frozenset[str]:
    return frozenset(normalise(p.text) for p in benchmark_prompts(canvas_size=canvas_size)
                     if p.family != "edit")


def is_held_out(text: str, *, family: str | None = None, canvas_size: int = DEFAULT_CANVAS_SIZE) -> bool:
    """True if `text` is a benchmark prompt (edits are held out by their source scene seed, since
    an instruction like 'make the circle blue' alone recurs across scenes)."""
    return family != "edit" and normalise(text) in _held_out_texts(canvas_size)
