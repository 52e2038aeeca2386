"""`shapes-geneval`: the held-out benchmark of the embedded world.

Fixed prompts per category (GenEval's six, implicit intent, edits), drawn once from a dedicated
seed. Implicit-intent prompts are stratified: every answer (colour; count 1-4) gets the same number
of prompts, its facts taken in turn, so no answer the model happens to favour is over-weighted.
Their exact texts never appear in pretraining or RL training: every training sampler asks
`is_held_out(text)` and redraws (tests/shapes check the samplers). Scoring is GenEval-style strict
correctness by the programmatic judge, per category.
"""
from __future__ import annotations

import random
from functools import lru_cache

from shapes.facts import IMPLICIT_COLOUR_FACTS, IMPLICIT_COUNT_FACTS, Fact
from shapes.prompts import FAMILIES, Prompt, generate
from shapes.tokenizer import normalise
from shapes.world import DEFAULT_CANVAS_SIZE

BENCHMARK_SEED = 20260512
PROMPTS_PER_CATEGORY = 24
CATEGORIES: tuple[str, ...] = FAMILIES          # six GenEval families + implicit colour/count + edit


def _stratified_facts(facts: tuple[Fact, ...], n: int, rng: random.Random) -> list[Fact]:
    """n facts: slot i asks for answer i mod (number of answers), that answer's facts in a shuffled
    turn, so the answers are as even as n allows."""
    values = sorted({f.value for f in facts}, key=str)
    by_value = {v: rng.sample([f for f in facts if f.value == v], k=sum(f.value == v for f in facts))
                for v in values}
    return [by_value[v][(i // len(values)) % len(by_value[v])]
            for i, v in ((i, values[i % len(values)]) for i in range(n))]


STRATIFIED = {"implicit_color": IMPLICIT_COLOUR_FACTS, "implicit_count": IMPLICIT_COUNT_FACTS}


@lru_cache(maxsize=4)
def benchmark_prompts(*, canvas_size: int = DEFAULT_CANVAS_SIZE,
                      per_category: int = PROMPTS_PER_CATEGORY) -> tuple[Prompt, ...]:
    """The benchmark, deterministic: `per_category` distinct prompt texts for each category."""
    out: list[Prompt] = []
    for c_idx, category in enumerate(CATEGORIES):
        rng = random.Random(BENCHMARK_SEED * 100 + c_idx)
        facts = (_stratified_facts(STRATIFIED[category], per_category, rng) if category in STRATIFIED
                 else [None] * per_category)
        seen: set[str] = set()
        tries = 0
        for fact in facts:
            while True:
                tries += 1
                if tries > 200 * per_category:
                    raise RuntimeError(f"benchmark: cannot find {per_category} distinct {category} prompts")
                p = generate(category, rng, canvas_size=canvas_size, fact=fact)
                if normalise(p.text) not in seen:
                    seen.add(normalise(p.text))
                    out.append(p)
                    break
    return tuple(out)


@lru_cache(maxsize=4)
def _held_out_texts(canvas_size: int) -> frozenset[str]:
    return frozenset(normalise(p.text) for p in benchmark_prompts(canvas_size=canvas_size)
                     if p.family != "edit")


def is_held_out(text: str, *, family: str | None = None, canvas_size: int = DEFAULT_CANVAS_SIZE) -> bool:
    """True if `text` is a benchmark prompt (edits are held out by their source scene seed, since
    an instruction like 'make the circle blue' alone recurs across scenes)."""
    return family != "edit" and normalise(text) in _held_out_texts(canvas_size)
