"""The small interface the trainer sees of where prompts come from (worlds are plugins behind it).

    PromptSource   next() -> PromptRecord (an endless, seeded stream), state() / restore(state)
    World          a plugin (entry-point group `alphagrpo.worlds`): training and held-out prompts
                   from its options, and optionally a Judge
    Judge          (images (N, H, W, 3) uint8, prompt) -> one strict verdict per image; reported,
                   never the reward; `summary` turns (category, verdict) pairs into the numbers the
                   world reports (e.g. a GenEval-style mean); optionally `plan_is_right(plan, prompt)`
                   (does a written plan state the request?), which splits failures into the plan's and
                   the drawing's; optionally `critique_kind(text)` (what an SRR reflection is: "instruction",
                   "description", "answer" or "other")

A prompt file is the world-less source (worlds.files); the shapes world is one plugin (shapes.plugin).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from worlds.records import PromptRecord

ENTRY_POINT_GROUP = "alphagrpo.worlds"
CRITIQUE_KINDS: tuple[str, ...] = ("instruction", "description", "answer", "other")   # Judge.critique_kind's answers


class PromptSource(Protocol):
    name: str                                         # names the source in logs and errors

    def next(self) -> PromptRecord: ...
    def state(self) -> dict[str, Any]: ...            # JSON-able: where the stream is
    def restore(self, state: dict[str, Any]) -> None: ...


class Judge(Protocol):
    def __call__(self, images: np.ndarray, prompt: PromptRecord) -> list[bool]: ...
    def summary(self, verdicts: Iterable[tuple[str, bool]]) -> dict[str, float]: ...


class World(Protocol):
    name: str

    def train_source(self, options: dict[str, Any], *, seed: int,
                     exclude: frozenset[str] = frozenset()) -> PromptSource: ...
    def heldout_prompts(self, options: dict[str, Any]) -> list[PromptRecord]: ...
    def judge(self) -> Judge | None: ...
