"""The shapes world as a plugin of the trainer (entry point `shapes` in `alphagrpo.worlds`).

    data.train:   {source: shapes, options: {families: [implicit_color], canvas_size: 32}}
    data.heldout: {source: shapes, options: {families: [...]}}     # shapes-geneval (edits excluded)

Training prompts come from the world's generators (seeded, never a held-out text); the held-out
prompts are the `shapes-geneval` benchmark; the judge is the world's programmatic strict judge,
summarised per category with the GenEval-style mean (shapes.evaluate.accuracy). The trainer sees
only worlds.base's interface: nothing in driver/ or actors/ imports this module.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import numpy as np

from shapes.benchmark import benchmark_prompts, is_held_out
from shapes.prompts import FAMILIES, Prompt, generate
from shapes.world import DEFAULT_CANVAS_SIZE
from worlds.config import DataConfigError
from worlds.records import PromptRecord, normalised

TEXT_TO_IMAGE: tuple[str, ...] = tuple(f for f in FAMILIES if f != "edit")
OPTIONS = ("families", "canvas_size")


def record(p: Prompt) -> PromptRecord:
    """A shapes prompt as the trainer's record (its meaning rides along for the judge and the reward)."""
    return PromptRecord(id=p.id, text=p.text, category=p.family, meaning=p.meaning, world="shapes",
                        metadata={"explicit_text": p.explicit_text}, origin=f"shapes:{p.family}")


def _options(options: dict[str, Any], key: str) -> tuple[list[str], int]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DataConfigError(f"{key}.options: unknown {unknown}; the shapes world takes {list(OPTIONS)}")
    families = list(options.get("families", TEXT_TO_IMAGE))
    for i, fam in enumerate(families):
        if fam not in TEXT_TO_IMAGE:
            raise DataConfigError(f"{key}.options.families[{i}]={fam!r}: not one of {TEXT_TO_IMAGE}")
    if not families:
        raise DataConfigError(f"{key}.options.families: empty; name at least one prompt family")
    return families, int(options.get("canvas_size", DEFAULT_CANVAS_SIZE))


class ShapesPrompts:
    """The training stream: families in turn at random from `families`, seeded, never a held-out text."""

    def __init__(self, families: list[str], *, seed: int, canvas_size: int,
                 exclude: frozenset[str] = frozenset()) -> None:
        self.families, self.canvas_size, self.exclude = list(families), canvas_size, exclude
        self.name = f"shapes[{','.join(self.families)}]"
        self.rng = random.Random(seed)
        self.redrawn = 0                  # generated prompts refused as held-out (redrawn)
        for fam in dict.fromkeys(self.families):
            self._check_trainable(fam)

    def _check_trainable(self, family: str, tries: int = 500) -> None:
        """Refuse a family whose every generated text is held out (two_objects: shapes-geneval holds out
        all of its 24 texts), which would otherwise make next() redraw forever."""
        rng = random.Random(f"trainable:{family}")
        for _ in range(tries):
            p = generate(family, rng, canvas_size=self.canvas_size)
            if not is_held_out(p.text, family=family, canvas_size=self.canvas_size) \
                    and normalised(p.text) not in self.exclude:
                return
        raise DataConfigError(f"data.train.options.families: {family!r} has no prompt to train on (none of "
                              f"{tries} generated texts is outside the held-out prompts); train on other families")

    def next(self) -> PromptRecord:
        while True:
            p = generate(self.rng.choice(self.families), self.rng, canvas_size=self.canvas_size)
            if is_held_out(p.text, family=p.family, canvas_size=self.canvas_size) or normalised(p.text) in self.exclude:
                self.redrawn += 1
                continue
            return record(p)

    def state(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "redrawn": self.redrawn}

    def restore(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.redrawn = int(state.get("redrawn", 0))


class ShapesJudge:
    """The programmatic strict judge (GenEval-style: every clause of the prompt's meaning holds)."""

    def __call__(self, images: np.ndarray, prompt: PromptRecord) -> list[bool]:
        from shapes.judge import judge
        return [judge(img, prompt.meaning).correct for img in images]

    def summary(self, verdicts: Iterable[tuple[str, bool]]) -> dict[str, float]:
        from shapes.evaluate import accuracy
        return accuracy(verdicts)

    def plan_is_right(self, plan: str, prompt: PromptRecord) -> bool:
        """Does the written plan state what the prompt asks for (shapes.plans)? Analysis, never a reward."""
        from shapes.plans import plan_is_right
        return plan_is_right(plan, prompt.meaning)

    def critique_kind(self, critique: str) -> str:
        """What an SRR reflection is: "instruction", "description", "answer" or "other" (shapes.critiques).
        Analysis, never a reward."""
        from shapes.critiques import critique_kind
        return critique_kind(critique)


class ShapesWorld:
    name = "shapes"

    def train_source(self, options: dict[str, Any], *, seed: int,
                     exclude: frozenset[str] = frozenset()) -> ShapesPrompts:
        families, canvas = _options(options, "data.train")
        return ShapesPrompts(families, seed=seed, canvas_size=canvas, exclude=exclude)

    def heldout_prompts(self, options: dict[str, Any]) -> list[PromptRecord]:
        families, canvas = _options(options, "data.heldout")
        return [record(p) for p in benchmark_prompts(canvas_size=canvas) if p.family in families]

    def judge(self) -> ShapesJudge:
        return ShapesJudge()
