"""DVReward: a verifier answers a prompt's question set on an image; `aggregate` makes the reward.

This is the plain class the reward actors wrap (the actor adds nothing but `ray.remote` options).
A verifier is anything with `answer(image, question_set) -> list[float]` (one yes-probability per
question, in order): `backends.shapes_verifier.ShapesVerifier` here; model-backed ones elsewhere.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from reward_service.aggregate import MODES, PARENT_RULES, SEMANTIC_RULES, RewardResult, aggregate
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
    semantic: str = "mean"           # how semantic questions combine: "mean" (the method's) | "product" |
                                     # "softmin" | "min" (reward_service.aggregate: a failed clause stays visible)
    semantic_temperature: float = 0.1   # softmin's tau
    category_weights: Mapping[str, float] = field(default_factory=dict)   # per semantic category; 1 if not given

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"RewardConfig.mode={self.mode!r}: not one of {MODES}")
        if self.parent_rule not in PARENT_RULES:
            raise ValueError(f"RewardConfig.parent_rule={self.parent_rule!r}: not one of {PARENT_RULES}")
        if not 0.0 <= self.fail_below < 1.0:
            raise ValueError(f"RewardConfig.fail_below={self.fail_below!r}: must be in [0, 1)")
        if self.semantic not in SEMANTIC_RULES:
            raise ValueError(f"RewardConfig.semantic={self.semantic!r}: not one of {SEMANTIC_RULES}")
        if not self.semantic_temperature > 0:
            raise ValueError(f"RewardConfig.semantic_temperature={self.semantic_temperature!r}: must be > 0")
        bad = {c: w for c, w in self.category_weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"RewardConfig.category_weights={bad}: weights must be >= 0")


    def aggregate(self, qs: QuestionSet, scores) -> RewardResult:
        """The reward of one image's scores under this rule (reward_service.aggregate)."""
        return aggregate(qs, scores, mode=self.mode, parent_rule=self.parent_rule, fail_below=self.fail_below,
                         semantic=self.semantic, temperature=self.semantic_temperature,
                         category_weights=self.category_weights)


class DVReward:
    """Score images against question sets."""

    def __init__(self, verifier: Verifier, *, config: RewardConfig | None = None) -> None:
        self.verifier = verifier
        self.config = config or RewardConfig()

    def score(self, image: Any, qs: QuestionSet) -> RewardResult:
        scores = self.verifier.answer(image, qs)
        return self.config.aggregate(qs, scores)
