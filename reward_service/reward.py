"""DVReward: a verifier answers a prompt's question set on an image; `aggregate` makes the reward.

This is the plain class the reward actors wrap (the actor adds nothing but `ray.remote` options).
A verifier is anything with `answer(image, question_set) -> list[float]` (one yes-probability per
question, in order): `backends.shapes_verifier.ShapesVerifier` here; model-backed ones elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from reward_service.aggregate import MODES, PARENT_RULES, RewardResult, aggregate
from reward_service.schema import QuestionSet


class Verifier(Protocol):
    name: str

    def answer(self, image: Any, qs: QuestionSet) -> list[float]: ...


@dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """How scores become a reward."""
    mode: str = "geometric"          # "geometric" (sqrt(sem * qual), the method's) | "mean" | "min"
    parent_rule: str = "none"        # "none" (the released code) | "zero" (DSG) | "scale"
    fail_below: float = 0.5          # a parent at or below this fails ("zero" rule)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RewardConfig.mode={self.mode!r}: not one of {MODES}")
        if self.parent_rule not in PARENT_RULES:
            raise ValueError(f"RewardConfig.parent_rule={self.parent_rule!r}: not one of {PARENT_RULES}")
        if not 0.0 <= self.fail_below < 1.0:
            raise ValueError(f"RewardConfig.fail_below={self.fail_below!r}: must be in [0, 1)")


class DVReward:
    """Score images against question sets."""

    def __init__(self, verifier: Verifier, *, config: RewardConfig | None = None) -> None:
        self.verifier = verifier
        self.config = config or RewardConfig()

    def score(self, image: Any, qs: QuestionSet) -> RewardResult:
        scores = self.verifier.answer(image, qs)
        return aggregate(qs, scores, mode=self.config.mode, parent_rule=self.config.parent_rule,
                         fail_below=self.config.fail_below)
